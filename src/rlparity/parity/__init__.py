"""Trainer <-> engine log-prob parity: the batch, the pairs, measured noise floors, the semantics preflight and
the first-diverging-layer diff.

    python -m rlparity.parity calibrate --model tiny   # measure the noise floors into fixtures/noise_floors.json
    python -m rlparity.parity compare --model tiny     # every available pair's metrics against its tolerance
    python -m rlparity.parity preflight --a hf --b vllm
    python -m rlparity.parity diff --a hf --b vllm     # also `rlparity diff`

Names are imported on first use, so that the command-line parsers (diff_command) load without torch.
"""

import importlib

_EXPORTS = {
    "ParityBatch": "batch", "parity_batch": "batch",
    "DiffReport": "diff", "diff_sides": "diff", "layer_diff": "diff", "naive_floors": "diff",
    "K_PARITY": "floors", "NoiseFloors": "floors", "calibrate": "floors", "load_floors": "floors",
    "PARITY_PAIRS": "pairs", "Pair": "pairs", "PairMeasurement": "pairs", "measure_pair": "pairs",
    "PreflightReport": "semantics", "preflight": "semantics",
    "EngineFailed": "sides", "EnginePool": "sides", "EngineUnavailable": "sides", "Side": "sides",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlparity.parity' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlparity.parity.{_EXPORTS[name]}"), name)
