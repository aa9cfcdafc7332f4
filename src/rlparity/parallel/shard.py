"""How a sequence maps onto ranks, and the checks every rank runs on its shard before any attention.

The layout both schemes take (each rank passes its shard through the attention contract):
- The sequence of T tokens, or for packed input the whole stream of T tokens, is cut into `world`
  equal contiguous shards: rank r holds tokens [r T/P, (r+1) T/P) of q, k and v, with every batch
  row and every head. Packed sequences are not aligned to shards; one may span several ranks.
- Every rank passes the whole `sinks` [heads_q] (a replicated parameter) and, for packed input, the
  whole `cu_seqlens` over the T tokens (the same tensor on every rank).
- T not divisible by the world size is rejected with an error; `pad_for_world` pads it so that no
  real token sees a padding token, and the caller drops the padded positions of the output.
- Sequence parallelism shards one self-attention sequence: q and k hold the same positions (training
  and prefill); decoding against a longer cache is not sharded here.
Contiguous shards keep Ulysses balanced; under causal attention the ring's later ranks attend to
more blocks than the earlier ones (a zigzag layout would balance them; not done here).

The checks run on every rank and their verdicts are exchanged (one small all_gather), so a bad input
on one rank makes every rank raise the same error, naming that rank, instead of leaving the others
waiting in a collective.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlparity.errors import RlparityError
from rlparity.parallel.comm import world_and_rank


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    seq_local: int
    cu_seqlens: tuple[int, ...] | None  # global offsets, the same on every rank

    def positions(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the tokens `rank` holds."""
        return rank * self.seq_local, (rank + 1) * self.seq_local


def _local_problems(q, k, v, sinks, *, window, cu_seqlens, world, rank, split_heads) -> str | None:
    """The first thing wrong with this rank's shard, as a sentence naming expected and received."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"rank {rank} received q, k, v of shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                "expected rank 4 [batch, heads, seq_shard, head_dim]")
    batch, heads_q, seq, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        return (f"rank {rank} received k of shape {tuple(k.shape)} and v of shape {tuple(v.shape)}, "
                f"expected both [{batch}, heads_kv, {seq}, {head_dim}]")
    if k.shape[2] != seq:
        return (f"rank {rank} received k with {k.shape[2]} tokens and q with {seq}, expected the same shard "
                "of one self-attention sequence for both")
    if heads_q % k.shape[1]:
        return f"rank {rank} received {k.shape[1]} kv heads, which do not divide its {heads_q} query heads"
    if tuple(sinks.shape) != (heads_q,):
        expected = f"({heads_q},): one logit per query head"
        if split_heads and heads_q % world == 0:
            first, last = rank * heads_q // world, (rank + 1) * heads_q // world - 1
            expected += f"; every rank passes all {heads_q} and uses its slice (heads {first}..{last})"
        return f"rank {rank} received sinks of shape {tuple(sinks.shape)}, expected {expected}"
    if not sinks.is_floating_point():
        return f"rank {rank} received sinks of dtype {sinks.dtype}, expected a floating-point dtype"
    if split_heads and heads_q % world:
        return (f"rank {rank} received q of shape {tuple(q.shape)}: its {heads_q} heads do not divide by the world "
                f"size {world}, expected a multiple of {world} heads so that each rank owns whole heads")
    if window is not None and window < 1:
        return f"window counts tokens and must be >= 1, rank {rank} received {window}"
    if cu_seqlens is not None:
        if batch != 1:
            return f"rank {rank} received packed input (cu_seqlens) with batch {batch}, expected batch 1"
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            return (f"rank {rank} received cu_seqlens of dtype {cu_seqlens.dtype} and shape "
                    f"{tuple(cu_seqlens.shape)}, expected 1-D int32 offsets [n_seqs + 1]")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            return f"rank {rank} received cu_seqlens {offsets}, expected non-decreasing offsets from 0"
    return None


def check_shards(scheme: str, q, k, v, sinks, *, window=None, cu_seqlens=None, group=None,
                 split_heads: bool = False) -> Layout:
    """Check this rank's shard and agree with every other rank; raise the same RlparityError everywhere."""
    world, rank = world_and_rank(group)
    problem = _local_problems(q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, world=world, rank=rank,
                              split_heads=split_heads)
    offsets = None if cu_seqlens is None or problem else tuple(cu_seqlens.tolist())
    mine = (problem, tuple(q.shape), tuple(k.shape), offsets)
    if world == 1:
        views = [mine]
    else:
        views = [None] * world
        dist.all_gather_object(views, mine, group=group)
    problems = [(r, view[0]) for r, view in enumerate(views) if view[0]]
    if problems:
        first_rank, first = problems[0]
        others = [r for r, _ in problems[1:]]
        also = f" (and a problem on rank(s) {', '.join(map(str, others))})" if others else ""
        raise RlparityError(f"{scheme}: {first}{also}")

    q_shapes = [view[1] for view in views]
    total = sum(shape[2] for shape in q_shapes)
    for r, shape in enumerate(q_shapes):
        if shape != q_shapes[0]:
            uneven = shape[:2] + shape[3:] == q_shapes[0][:2] + q_shapes[0][3:]
            hint = (f": a sequence of {total} tokens does not split into {world} equal shards; pad it to "
                    f"{total + (-total % world)} with rlparity.parallel.pad_for_world" if uneven else "")
            raise RlparityError(f"{scheme}: rank {r} received q of shape {shape}, rank 0 of shape {q_shapes[0]}, "
                                f"expected the same shape on every rank{hint}")
    for r, view in enumerate(views):
        if view[2] != views[0][2]:
            raise RlparityError(f"{scheme}: rank {r} received k of shape {view[2]}, rank 0 of shape {views[0][2]}, "
                                "expected the same shape on every rank")
        if view[3] != views[0][3]:
            raise RlparityError(f"{scheme}: rank {r} received cu_seqlens {list(view[3] or [])}, rank 0 "
                                f"{list(views[0][3] or [])}, expected the same global offsets on every rank")
    seq_local = q_shapes[0][2]
    if offsets is not None and offsets[-1] != world * seq_local:
        raise RlparityError(f"{scheme}: cu_seqlens ends at {offsets[-1]} tokens, expected {world * seq_local}: "
                            f"the whole packed stream ({world} ranks x {seq_local} tokens), the same on every rank")
    return Layout(world, rank, seq_local, offsets)


def shard(x: torch.Tensor, world: int, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s contiguous shard of a whole sequence (dim 2 of [batch, heads, seq, head_dim])."""
    if x.shape[dim] % world:
        raise RlparityError(f"shard: {x.shape[dim]} tokens do not split into {world} equal shards; "
                            "pad with rlparity.parallel.pad_for_world first")
    return x.chunk(world, dim=dim)[rank]


def pad_for_world(q, k, v, world: int, *, cu_seqlens=None, causal: bool = True):
    """(q, k, v, cu_seqlens, pad): the sequence padded at its end to a multiple of `world` tokens.

    No real query sees a padding key: packed input gets the padding as a sequence of its own; causal
    unpacked input needs nothing more (the padding comes after every real token); bidirectional
    unpacked input with batch 1 is packed as [real, padding]. Drop the last `pad` output positions.
    """
    total = q.shape[2]
    pad = -total % world
    if pad == 0:
        return q, k, v, cu_seqlens, 0
    if cu_seqlens is None and not causal:
        if q.shape[0] != 1:
            raise RlparityError(f"pad_for_world: bidirectional input with batch {q.shape[0]} cannot be padded "
                                "without padding keys becoming visible; pass it packed (batch 1 with cu_seqlens)")
        cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=q.device)
    if cu_seqlens is not None:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + pad])])

    def padded(x):
        return torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)

    return padded(q), padded(k), padded(v), cu_seqlens, pad
