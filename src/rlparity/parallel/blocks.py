"""Which (query shard, key block) pairs of ring attention hold visible pairs, as calls of the contract.

A ring step gives rank r the keys of another rank's shard. The visible (query, key) pairs of that
block are expressed as one call of an ordinary backend, by trimming the block to the queries and keys
that take part and choosing causal/window so that the contract's bottom-right alignment reproduces the
absolute positions:
- the diagonal block (the rank's own keys): the caller's causal and window, and for packed input the
  sequence boundaries that fall inside the shard;
- keys after the queries: nothing when causal, else everything;
- keys before the queries: everything without a window; with one, the queries that see at least one
  key and the keys seen by at least one query, under causal=False and window W, the contract's lower
  bound only (query at position p sees keys j > p - W), W chosen for the trimmed shapes;
- packed input: at most one sequence spans two disjoint blocks; the block is cut down to it.
Every query row of every call sees at least one key, so a kernel never meets an empty row.
A block with no visible pair is None and costs nothing.
"""

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockCall:
    queries: slice  # rows of this rank's query shard
    keys: slice  # rows of the key block
    causal: bool
    window: int | None
    cu_seqlens: tuple[int, ...] | None  # offsets local to the block (the diagonal block of packed input)


def _sequence_around(offsets: tuple[int, ...], position: int) -> tuple[int, int]:
    """[start, stop) of the packed sequence holding `position`."""
    index = bisect.bisect_right(offsets, position) - 1
    return offsets[index], offsets[index + 1]


def _diagonal(start: int, stop: int, causal, window, offsets) -> BlockCall:
    local = None
    if offsets is not None:
        inside = [o - start for o in offsets if start < o < stop]
        local = (0, *inside, stop - start)
    return BlockCall(slice(0, stop - start), slice(0, stop - start), causal, window, local)


def plan_block(query_range: tuple[int, int], key_range: tuple[int, int], *, causal: bool, window: int | None,
               cu_seqlens: tuple[int, ...] | None) -> BlockCall | None:
    """The one kernel call covering the visible pairs of a query shard and a key block (absolute [start, stop))."""
    qa, qb = query_range
    ka, kb = key_range
    if (qa, qb) == (ka, kb):
        return _diagonal(qa, qb, causal, window, cu_seqlens)
    keys_before = kb <= qa
    q0, q1, k0, k1 = qa, qb, ka, kb
    if cu_seqlens is not None:
        # The only sequence in both blocks is the one holding the last token of the earlier block.
        start, stop = _sequence_around(cu_seqlens, (kb if keys_before else qb) - 1)
        if keys_before:
            q1, k0 = min(qb, stop), max(ka, start)
        else:
            q0, k1 = max(qa, start), min(kb, stop)
        if q1 <= q0 or k1 <= k0:
            return None
    if not keys_before:
        return None if causal else BlockCall(slice(q0 - qa, q1 - qa), slice(k0 - ka, k1 - ka), False, None, None)
    block_window = None
    if window is not None:
        q1 = min(q1, k1 - 1 + window)  # later queries see none of these keys
        k0 = max(k0, q0 - window + 1)  # earlier keys are seen by no query
        if q1 <= q0 or k1 <= k0:
            return None
        if window <= (q1 - 1) - k0:  # the last query misses the first key: bound it, aligned bottom-right
            block_window = (k1 - k0) - (q1 - q0) + window - (q0 - k0)
    return BlockCall(slice(q0 - qa, q1 - qa), slice(k0 - ka, k1 - ka), False, block_window, None)


def ring_steps(world: int, seq_local: int, *, causal: bool, window: int | None) -> int:
    """How many hops the keys travel: all the way round, or only as far back as the window reaches."""
    if not causal or window is None:
        return world - 1
    # The block t hops back starts t * S before the shard; its last key is seen while t S <= window + S - 2.
    return min(world - 1, (window + seq_local - 2) // seq_local)
