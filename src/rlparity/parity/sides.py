"""One side of a comparison, `engine[:dtype]`, and the pool that opens each side once and remembers failures.

    Side.parse("vllm:bf16") -> Side(engine="vllm", dtype="bfloat16"), labelled "vllm[bfloat16]"

An engine that cannot run here (not installed; a constructor that raises NotImplementedError) raises
EngineUnavailable with the engine's own actionable reason; one that fails to start or dies raises EngineFailed with
its message (for engines in a process of their own, that ends with the tail of the engine's log). Every later
request for either gets the same error at once instead of a second start.
"""

import contextlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlparity.engines import EngineUnavailable, engine_names, open_engine
from rlparity.engines.process import EngineProcessError
from rlparity.errors import RlparityError

DTYPES = {"float64": torch.float64, "fp64": torch.float64, "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SHORT = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16"}
# Engines that may be missing on a machine, and the function saying why (None when they can be tried).
# The others run in this process on torch and transformers alone.
AVAILABILITY_PROBES = {"vllm": "rlparity.engines.vllm:unavailable_reason",
                       "sglang": "rlparity.engines.sglang:unavailable_reason"}


def canonical_dtype(name: str) -> str:
    if name not in DTYPES:
        raise RlparityError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return str(DTYPES[name]).removeprefix("torch.")


def known_engines() -> list[str]:
    return engine_names()


@dataclass(frozen=True)
class Side:
    engine: str
    dtype: str  # canonical: float64, float32, bfloat16
    options: tuple = ()  # (key, value as JSON) pairs for the engine's constructor, e.g. a planted hf_overrides

    @classmethod
    def parse(cls, text: str, default_dtype: str = "float32", options: dict | None = None) -> "Side":
        engine, _, dtype = text.partition(":")
        if engine not in known_engines():
            raise RlparityError(f"unknown engine {engine!r} in {text!r}: expected one of {known_engines()} (or "
                                f"yours, given with --engine NAME=module:Class), optionally with :dtype "
                                f"({', '.join(sorted(DTYPES))})")
        encoded = tuple(sorted((key, json.dumps(value)) for key, value in (options or {}).items()))
        return cls(engine, canonical_dtype(dtype or default_dtype), encoded)

    @property
    def constructor_options(self) -> dict:
        return {key: json.loads(value) for key, value in self.options}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        planted = "".join(f",{key}={value}" for key, value in self.options)
        return f"{self.engine}[{self.dtype}{planted}]"

    @property
    def short(self) -> str:
        return f"{self.engine}-{SHORT[self.dtype]}"


def _load(target: str):
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def unavailable_reason(engine: str) -> str | None:
    """None if the engine can be tried here, else why not and what to install."""
    return _load(AVAILABILITY_PROBES[engine])() if engine in AVAILABILITY_PROBES else None


def open_side(side: Side, checkpoint: Path | str, max_len: int | None = None):
    options = {"dtype": side.torch_dtype, "max_len": max_len, **side.constructor_options}
    return open_engine(side.engine, checkpoint, **options)


class EngineFailed(Exception):
    """The engine failed to start or died; the message is its error (with the engine's log tail, if it has one)."""


class Guarded:
    """An open engine whose death (EngineProcessError from any of its methods: its process died, hung, failed a
    request or answered wrong) marks its side failed in the pool and surfaces as EngineFailed; everything else
    passes through."""

    def __init__(self, engine, side: Side, pool: "EnginePool"):
        self._engine, self._side, self._pool = engine, side, pool

    def __getattr__(self, name):
        attribute = getattr(self._engine, name)
        if name == "close" or not inspect.ismethod(attribute):  # not e.g. an hf engine's model, a module
            return attribute

        def guarded(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except EngineProcessError as exc:
                raise EngineFailed(self._pool.fail(self._side, exc)) from exc
        return guarded


class EnginePool:
    def __init__(self, checkpoint: Path | str, max_len: int | None = None):
        self.checkpoint = Path(checkpoint)
        self.max_len = max_len
        self._open: dict[Side, Guarded] = {}
        self._failed: dict[Side, str] = {}
        self._unavailable: dict[Side, str] = {}

    def get(self, side: Side):
        if side in self._open:
            return self._open[side]
        if side in self._failed:
            raise EngineFailed(self._failed[side])
        if side in self._unavailable:
            raise EngineUnavailable(self._unavailable[side])
        reason = unavailable_reason(side.engine)
        if reason is not None:
            raise EngineUnavailable(f"{side.label}: {reason}")
        try:
            engine = open_side(side, self.checkpoint, self.max_len)
        except EngineUnavailable as exc:
            self._unavailable[side] = f"{side.label}: {exc}"
            raise EngineUnavailable(self._unavailable[side]) from exc
        except Exception as exc:  # a start failure of any kind is this side's verdict, not the session's end
            self.fail(side, exc, "failed to start")
            raise EngineFailed(self._failed[side]) from exc
        self._open[side] = Guarded(engine, side, self)
        return self._open[side]

    def fail(self, side: Side, exc: BaseException, what: str = "died") -> str:
        """Marks an engine dead (closing it) so that later requests for it fail at once; returns the message."""
        self._failed[side] = f"{side.label} {what}: {type(exc).__name__}: {exc}"
        guarded = self._open.pop(side, None)
        if guarded is not None:
            try:
                guarded.close()
            except Exception:  # closing a dead engine may fail too; its first error is the one reported
                pass
        return self._failed[side]

    def release(self, side: Side) -> None:
        """Closes one side's engine now (a later `get` opens it again)."""
        guarded = self._open.pop(side, None)
        if guarded is not None:
            guarded.close()

    def close(self) -> None:
        """Closes every open engine, each even if closing another raised."""
        engines, self._open = list(self._open.values()), {}
        with contextlib.ExitStack() as stack:
            for engine in engines:
                stack.callback(engine.close)

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
