"""Attention backends by name, each with a capability probe.

A backend is a function with the contract's signature, named by an import path ("module:function")
so that listing backends imports nothing heavy. Its probe answers "available" or why not.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlparity.doors import resolve_callable
from rlparity.errors import RlparityError

AVAILABLE = "available"
CONTRACT_KEYWORDS = ("causal", "window", "scale", "cu_seqlens")
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def always_available(device: torch.device) -> str:
    return AVAILABLE


@dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:function"
    summary: str
    probe: Callable[[torch.device], str] = always_available
    backward_probe: Callable[[torch.device], str] = always_available
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    gpu_only: bool = False
    _loaded: list = field(default_factory=list, compare=False, repr=False)

    def availability(self, device: torch.device) -> str:
        if self.gpu_only and device.type != "cuda":
            return f"{self.name} needs a CUDA device; run `nox -s gpu_conformance` on a GPU machine"
        try:
            return self.probe(device)
        except Exception as exc:  # a probe that crashes is itself a reason not to run
            return f"{self.name} probe raised {type(exc).__name__}: {exc}"

    def attend(self, *args, **kwargs):
        if not self._loaded:
            self._loaded.append(resolve_callable(self.target, f"attention backend {self.name!r} at"))
        return self._loaded[0](*args, **kwargs)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise RlparityError(f"attention backend {backend.name!r} is registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def registered_backends() -> list[Backend]:
    return list(_REGISTRY.values())


def get_backend(name_or_target: str) -> Backend:
    """A registered backend by name, or a user's function given as "module:function"."""
    if name_or_target in _REGISTRY:
        return _REGISTRY[name_or_target]
    if ":" in name_or_target:
        return user_backend(name_or_target)
    known = ", ".join(sorted(_REGISTRY))
    raise RlparityError(
        f"unknown attention backend {name_or_target!r}: expected one of {known} or a 'module:function' path"
    )


def user_backend(target: str) -> Backend:
    """Wrap a user's function; fails now, with the reason, if it cannot be imported or has the wrong signature.

    The module is looked up as `python -m` would: the current directory comes first (rlparity.doors).
    """
    fn = resolve_callable(target, "attention backend")
    check_signature(fn, target)
    return Backend(name=target, target=target, summary="user-supplied backend", _loaded=[fn])


def check_signature(fn: Callable, name: str) -> None:
    """The contract: attend(q, k, v, sinks, *, causal, window, scale, cu_seqlens)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C extensions do not expose one; the call itself will tell
    params = signature.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        missing = []
    else:
        missing = [kw for kw in CONTRACT_KEYWORDS if kw not in params]
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
    if missing or (len(positional) < 4 and not takes_varargs):
        raise RlparityError(
            f"attention backend {name!r}: expected signature "
            f"attend(q, k, v, sinks, *, causal, window, scale, cu_seqlens), got {fn.__name__}{signature}"
        )
