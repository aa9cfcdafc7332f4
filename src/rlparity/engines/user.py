"""Your engine: a class of yours behind the engine protocol (rlparity.engines.base), named on the command line as

    --engine NAME=module:Class        e.g. --engine mine=my_engine:MyEngine, then --b mine:float32

and then used wherever a bundled engine is (check parity, preflight, diff, routing, the conformance suite).

The constructor contract, the same as the bundled engines' (rlparity.engines.open_engine calls it):

    Class(checkpoint: pathlib.Path, *, dtype: torch.dtype, max_len: int | None, **options)
      checkpoint  the GPT-OSS checkpoint folder of the check (config.json, safetensors, tokenizer.json)
      dtype       the side's dtype: torch.float32, torch.bfloat16 or torch.float64 ("mine:bf16" -> torch.bfloat16)
      max_len     the longest sequence the check sends, or None (then the model's max_position_embeddings)
      options     the side's --a-option / --b-option KEY=JSON pairs, as keyword arguments
    raise NotImplementedError("why") where it cannot run (this dtype, no GPU here): the side is then skipped with
    that reason, never failed. An optional class attribute `dtypes = ("float32", ...)` says the same up front.

The methods: logprobs(token_ids, prompt_len, sampling=RAW) -> one 1-D tensor per sequence (required; raise
NotImplementedError for a Sampling it cannot give: that probe of the preflight is skipped); routing(token_ids) and
hidden_states(token_ids) (optional: `rlparity routing` and `rlparity diff` need them). The attributes the bundled
engines carry are optional: UserEngine fills in name ("NAME[dtype]"), tokenizer (the checkpoint's tokenizer.json;
set your own TokenizerInfo, rlparity.engines.tokenizer_info(path), if your engine tokenizes with another one),
max_len, config (the checkpoint's) and close().
"""

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines.base import RAW, Sampling
from rlparity.errors import RlparityError
from rlparity.models.checkpoint import open_checkpoint

ENGINE_SPEC_EXAMPLE = "mine=my_engine:MyEngine"
# What Side.parse ("NAME:dtype"), Side.label ("NAME[dtype]") and record subjects can carry unchanged.
ENGINE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def parse_engine_spec(spec: str) -> tuple[str, str]:
    """"NAME=module:Class" -> (NAME, "module:Class"); the name is checked here, the target by the resolver."""
    name, sep, target = spec.partition("=")
    if not sep or not target:
        raise RlparityError(f"--engine {spec!r}: expected NAME=module:Class (e.g. {ENGINE_SPEC_EXAMPLE})")
    if not ENGINE_NAME.fullmatch(name):
        raise RlparityError(f"--engine {spec!r}: the name {name!r} must start with a letter and hold only letters, "
                            f"digits, '_', '.' and '-' (e.g. {ENGINE_SPEC_EXAMPLE})")
    return name, target


def check_engine_class(name: str, target: str, engine_class) -> None:
    """Refuses what cannot be an engine: not callable, or without logprobs."""
    what = f"engine {name!r} ({target})"
    if not callable(engine_class):
        raise RlparityError(f"{what}: {type(engine_class).__name__} is not a class; expected a class whose "
                            f"constructor takes (checkpoint, *, dtype, max_len, **options)")
    if not callable(getattr(engine_class, "logprobs", None)):
        raise RlparityError(f"{what}: {getattr(engine_class, '__name__', engine_class)!r} has no logprobs method; an "
                            f"engine has logprobs(token_ids, prompt_len, sampling) -> one 1-D tensor per sequence")


def declared_dtypes(engine_class) -> tuple[str, ...] | None:
    """The class's `dtypes` attribute in canonical names (float32, bfloat16, float64), or None when it has none."""
    declared = getattr(engine_class, "dtypes", None)
    if declared is None:
        return None
    names = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}
    return tuple(names.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")) for dtype in declared)


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


class EngineAnswerError(ValueError):
    """A user's engine answered in a form the protocol does not allow. Not an RlparityError: that one, raised by
    logprobs, means "not offered" (a preflight probe is then skipped), while a malformed answer is the engine's
    error (the pair's verdict is then `error`, with this message)."""


class UserEngine:
    """A user's engine with what the protocol's attributes default to, its answers checked at the boundary.

    Everything else (routing, hidden_states, sample, the engine's own attributes) is the user's object's."""

    def __init__(self, name: str, engine_class, checkpoint: Path | str, *, dtype: torch.dtype = torch.float32,
                 max_len: int | None = None, **options):
        dtypes = declared_dtypes(engine_class)
        if dtypes is not None and dtype_name(dtype) not in dtypes:
            raise NotImplementedError(f"it runs in {list(dtypes)} (its dtypes attribute), not {dtype_name(dtype)}")
        opened = open_checkpoint(checkpoint)
        inner = engine_class(opened.path, dtype=dtype, max_len=max_len, **options)
        self.inner = inner
        self.name = getattr(inner, "name", None) or f"{name}[{dtype_name(dtype)}]"
        self.dtype = dtype  # the dtype it was opened in (rlparity.routing compares engines' dtypes)
        self.checkpoint = Path(getattr(inner, "checkpoint", None) or opened.path)
        self.config = getattr(inner, "config", None) or opened.config
        self.tokenizer = getattr(inner, "tokenizer", None) or opened.tokenizer
        self.max_len = getattr(inner, "max_len", None) or max_len or opened.max_position_embeddings

    def __getattr__(self, name):
        if name == "inner":  # not set yet (a failed constructor): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]:
        try:
            values = self.inner.logprobs(token_ids, prompt_len, sampling)
        except NotImplementedError as exc:
            raise RlparityError(f"{self.name} does not implement {sampling}: {exc}") from exc
        if not isinstance(values, (list, tuple)) or len(values) != len(token_ids):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise EngineAnswerError(f"{self.name}.logprobs returned {got} for {len(token_ids)} sequences; expected "
                                    f"a list of one 1-D tensor per sequence")
        for i, value in enumerate(values):
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise EngineAnswerError(f"{self.name}.logprobs returned {shape} for sequence {i}; expected a 1-D "
                                        f"tensor of the response tokens' log-probs")
        return list(values)

    def close(self) -> None:
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()
