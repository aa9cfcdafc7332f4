"""Log-prob producers behind one protocol (rlparity.engines.base), opened by name.

An engine is a class named by an import path, so listing engines imports nothing heavy; a new engine
is one module plus one `register_engine` line here. A user's engine comes in through the same door,
`register_user_engine("NAME=module:Class")` (the --engine option), and is opened like the bundled ones
(rlparity.engines.user: the constructor contract and what it may leave out).
"""

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
from rlparity.engines.user import UserEngine, check_engine_class, parse_engine_spec
from rlparity.errors import RlparityError
from rlparity.models.tokenizer_info import TokenizerInfo, tokenizer_info

_ENGINES: dict[str, str] = {}
_USER_ENGINES: set[str] = set()  # the names registered by register_user_engine


class EngineUnavailable(RlparityError):
    """The engine cannot run on this machine (not installed, a dtype or device it lacks); the message says why and
    what to install or where to run. A check skips such a side with the reason: it is never a failure."""


def register_engine(name: str, target: str) -> None:
    if name in _ENGINES:
        raise RlparityError(f"engine {name!r} is registered twice")
    _ENGINES[name] = target


def register_user_engine(spec: str) -> str:
    """Registers a user's engine class from "NAME=module:Class" (the --engine option of every command and of the
    pytest plugin) and returns NAME. Registering the same spec again is a no-op; a NAME that is rlparity's own
    engine or already names another class, a module that does not import, or a class without logprobs is refused
    with one line."""
    from rlparity.doors import resolve

    name, target = parse_engine_spec(spec)
    if name in _ENGINES and name not in _USER_ENGINES:
        raise RlparityError(f"--engine {spec!r}: {name!r} is one of rlparity's own engines "
                            f"({', '.join(bundled_engine_names())}); give yours another name")
    if name in _USER_ENGINES:
        if _ENGINES[name] != target:
            raise RlparityError(f"--engine {spec!r}: {name!r} is already registered as {_ENGINES[name]}")
        return name
    check_engine_class(name, target, resolve(target, f"engine {name!r}, class"))
    _ENGINES[name] = target
    _USER_ENGINES.add(name)
    return name


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def bundled_engine_names() -> list[str]:
    return sorted(set(_ENGINES) - _USER_ENGINES)


def is_user_engine(name: str) -> bool:
    return name in _USER_ENGINES


def engine_class(name: str):
    """The class registered as `name` (imported now)."""
    from rlparity.doors import resolve

    if name not in _ENGINES:
        raise RlparityError(f"unknown engine {name!r}: expected one of {engine_names()}, or yours with "
                            f"--engine NAME=module:Class")
    return resolve(_ENGINES[name], f"engine {name!r}, class")


def open_engine(name: str, checkpoint: Path | str, **options) -> Engine:
    """An engine by name on a checkpoint folder; `options` go to its constructor (dtype, max_len, ...).

    A constructor that raises NotImplementedError cannot run here: EngineUnavailable, with its reason."""
    opened_class = engine_class(name)
    try:
        if name in _USER_ENGINES:
            return UserEngine(name, opened_class, checkpoint, **options)
        return opened_class(checkpoint, **options)
    except NotImplementedError as exc:
        reason = str(exc) or "its constructor raised NotImplementedError"
        raise EngineUnavailable(f"engine {name!r} cannot run here: {reason}") from exc


register_engine("hf", "rlparity.engines.hf:HFEngine")
register_engine("reference", "rlparity.engines.reference:ReferenceEngine")
register_engine("vllm", "rlparity.engines.vllm:VllmEngine")
register_engine("hf_fsdp", "rlparity.engines.hf_fsdp:HFFsdpEngine")
register_engine("sglang", "rlparity.engines.sglang:SglangEngine")

__all__ = [
    "RAW",
    "CaptureEngine",
    "Engine",
    "EngineUnavailable",
    "Routing",
    "RoutingEngine",
    "Sampling",
    "TokenizerInfo",
    "bundled_engine_names",
    "capture_points",
    "captures",
    "engine_class",
    "engine_names",
    "is_user_engine",
    "open_engine",
    "register_engine",
    "register_user_engine",
    "require_same_tokenizers",
    "routes",
    "tokenizer_info",
]
