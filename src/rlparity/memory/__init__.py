"""Peak memory of RL training steps on GPT-OSS: measured (three meters) and predicted (a closed form).

    meter_for(device)        TrackedMeter (live tensor storages, cpu and meta) or CudaMeter (the allocator)
    steps                    the measured workloads: one decoder layer, the log-prob pass, a training step
    fake                     real-size GPT-OSS layers on the meta device; fused-kernel footprints
    analytic                 the closed-form model per phase; `estimate(Workload(...))`
    configs                  GPT-OSS-20B / -120B and the bundled models by name
    cli                      `rlparity memory`: the phase table of an estimate and whether it fits a budget

The fixes the ceilings are held to live in rlparity.ops (chunked log-probs, grouped experts).
"""

import importlib

# Attributes load their module on first use, so that `rlparity memory`'s parser can be built without torch.
_EXPORTS = {"Meter": "meter", "gpt_oss_kind": "meter", "meter_for": "meter", "MemoryReport": "report",
            "format_bytes": "report", "parse_bytes": "report", "TrackedMeter": "tracker"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlparity.memory' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlparity.memory.{_EXPORTS[name]}"), name)
