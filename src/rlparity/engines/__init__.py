"""Log-prob producers behind one protocol (rlparity.engines.base), opened by name.

An engine is a class named by an import path, so listing engines imports nothing heavy; a new engine
is one module plus one `register_engine` line here.
"""

import importlib
from pathlib import Path

from rlparity.engines.base import (
    RAW,
    CaptureEngine,
    Engine,
    Routing,
    RoutingEngine,
    Sampling,
    capture_points,
    captures,
    require_same_tokenizers,
    routes,
)
from rlparity.errors import RlparityError

_ENGINES: dict[str, str] = {}


def register_engine(name: str, target: str) -> None:
    if name in _ENGINES:
        raise RlparityError(f"engine {name!r} is registered twice")
    _ENGINES[name] = target


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def open_engine(name: str, checkpoint: Path | str, **options) -> Engine:
    """An engine by name on a checkpoint folder; `options` go to its constructor (dtype, max_len, ...)."""
    if name not in _ENGINES:
        raise RlparityError(f"unknown engine {name!r}: expected one of {engine_names()}")
    module_name, _, class_name = _ENGINES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(checkpoint, **options)


register_engine("hf", "rlparity.engines.hf:HFEngine")
register_engine("reference", "rlparity.engines.reference:ReferenceEngine")
register_engine("vllm", "rlparity.engines.vllm:VllmEngine")
register_engine("hf_fsdp", "rlparity.engines.hf_fsdp:HFFsdpEngine")
register_engine("sglang", "rlparity.engines.sglang:SglangEngine")

__all__ = [
    "RAW",
    "CaptureEngine",
    "Engine",
    "Routing",
    "RoutingEngine",
    "Sampling",
    "capture_points",
    "captures",
    "engine_names",
    "open_engine",
    "register_engine",
    "require_same_tokenizers",
    "routes",
]
