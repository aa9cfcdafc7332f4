"""The trainer side as verl's FSDP actor runs it: transformers' GptOssForCausalLM under FSDP2, data-parallel.

Each of `world_size` ranks (processes of a gloo group, rlparity.parallel.launch.WorkerGroup) loads the
checkpoint exactly as the `hf` engine does, then shards it with FSDP2 (`fully_shard` on every decoder layer,
then on the root), so a forward all-gathers each layer's parameters just before using it and frees them
after. A logprobs call splits the sequences into `world_size` contiguous slices; every rank computes its
slice as the `hf` engine would (one right-padded batch, float32 log-softmax) and the parent gathers the
slices back in order.

    with HFFsdpEngine(checkpoint, world_size=2, dtype="float32") as engine:
        engine.logprobs([ids, ...], [prompt_len, ...])

Forward only: FSDP's all-gather concatenates parameter shards bit-exactly, so what can differ from the
plain `hf` engine is what a different batch and thread count do to float32 kernels (padding length, which
tokens share an expert's matmul, each rank's share of the cores). The process group is gloo on any machine, as
in the verl setup this mirrors on CPU.
"""

import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines.base import RAW, Sampling, check_request, engine_max_len
from rlparity.engines.hf import EXPERTS_IMPLEMENTATIONS, parse_dtype
from rlparity.errors import RlparityError
from rlparity.models.checkpoint import open_checkpoint

DEFAULT_WORLD_SIZE = 2
# Loading transformers and the checkpoint on every rank of a loaded 2-core machine: seconds for the bundled
# models; the limit leaves room for larger checkpoints.
LOAD_TIMEOUT_S = 600.0

# Per worker process: the sharded engines it holds, by the id of the HFFsdpEngine that created them.
_RANK_ENGINES: dict = {}


def slice_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """`count` items cut into `parts` contiguous slices whose sizes differ by at most one (the first are larger)."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _load_rank(key: str, checkpoint: str, dtype: str, attn_implementation: str, experts_implementation: str,
               max_len: int | None, tokenizer: str | None) -> dict:
    """On every rank: load the hf engine, shard its model with FSDP2, run one sharded forward."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from rlparity.engines.hf import HFEngine

    engine = HFEngine(checkpoint, dtype=dtype, attn_implementation=attn_implementation,
                      experts_implementation=experts_implementation, max_len=max_len, tokenizer=tokenizer)
    for layer in engine.model.model.layers:
        fully_shard(layer)
    fully_shard(engine.model)
    # Counted before any forward: FSDP2 keeps the root's parameters gathered after one (the backward would need
    # them at once), so later only the decoder layers' parameters are sharded.
    local = sum(p.to_local().numel() for p in engine.model.parameters())
    # A path that loads but cannot run sharded fails here, on every rank alike, rather than at the first request.
    engine._forward(torch.full((1, 2), engine.pad_id))
    _RANK_ENGINES[key] = engine
    return {"rank": dist.get_rank(), "local_parameters": local,
            "sharded_modules": sum(isinstance(m, FSDPModule) for m in engine.model.modules()),
            "torch": torch.__version__}


def _logprobs_rank(key: str, slices: list[tuple[int, int]], token_ids: list[list[int]], prompt_len: list[int],
                   sampling: Sampling) -> list[torch.Tensor]:
    import torch.distributed as dist

    engine = _RANK_ENGINES[key]
    start, stop = slices[dist.get_rank()]
    if start == stop:
        # Every rank must take part in every forward's all-gathers, even with no sequence of its own.
        engine._forward(torch.full((1, 2), engine.pad_id))
        return []
    return engine.logprobs(token_ids[start:stop], prompt_len[start:stop], sampling)


class HFFsdpEngine:
    def __init__(self, checkpoint: Path | str, *, world_size: int = DEFAULT_WORLD_SIZE,
                 dtype: torch.dtype | str = torch.float32, attn_implementation: str = "eager",
                 experts_implementation: str = "eager", max_len: int | None = None,
                 tokenizer: Path | str | None = None, load_timeout: float = LOAD_TIMEOUT_S):
        from rlparity.parallel.launch import WorkerGroup

        self._group = None
        self.dtype = parse_dtype(dtype)
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.name = f"hf_fsdp[{world_size}x,{attn_implementation},{experts_implementation},{dtype_name}]"
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise RlparityError(f"{self.name}: world_size must be a positive integer, got {world_size!r}")
        if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise RlparityError(f"{self.name}: experts_implementation {experts_implementation!r} is not one of "
                                f"{EXPERTS_IMPLEMENTATIONS}")
        opened = open_checkpoint(checkpoint, tokenizer)
        self.checkpoint, self.config, self.tokenizer = opened.path, opened.config, opened.tokenizer
        self.max_len = engine_max_len(self.name, max_len, opened.max_position_embeddings, opened.path)
        self.world_size = world_size
        self._key = uuid.uuid4().hex
        self._group = WorkerGroup(world_size, backend="gloo")
        try:
            self.info = self._group.run(
                _load_rank, self._key, str(opened.path), dtype_name, attn_implementation, experts_implementation,
                self.max_len, None if tokenizer is None else str(tokenizer), timeout_s=load_timeout)
        except RlparityError as exc:
            self._group.close()
            raise RlparityError(f"{self.name}: loading and sharding the model failed: {exc}") from exc

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]:
        """Teacher-forced log-probs as the hf engine computes them, each rank a contiguous slice of the sequences."""
        check_request(self.name, token_ids, prompt_len, self.max_len, self.config["vocab_size"])
        if self._group is None or not self._group.alive:
            raise RlparityError(f"{self.name}: the engine is closed")
        sequences = [[int(token) for token in sequence] for sequence in token_ids]
        prompts = [int(prompt) for prompt in prompt_len]
        slices = slice_bounds(len(sequences), self.world_size)
        per_rank = self._group.run(_logprobs_rank, self._key, slices, sequences, prompts, sampling)
        return [values for rank_values in per_rank for values in rank_values]

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def __enter__(self) -> "HFFsdpEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["HFFsdpEngine", "slice_bounds", "DEFAULT_WORLD_SIZE"]
