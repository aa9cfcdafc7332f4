"""Sequence-parallel sink attention over torch.distributed (Ulysses and ring), and how to launch it.

    from rlparity.parallel import ring_attend, ulysses_attend
    out, lse = ulysses_attend(q_shard, k_shard, v_shard, sinks, causal=True, window=128, inner="chunked")

Both implement the interface of a sequence-parallel attention (rlparity.parallel.interface: each
rank passes its sequence shard, layout in rlparity.parallel.shard, and the whole sinks); the inner
kernel is any registered backend. The gradient each rank gets for the replicated `sinks` is its own
contribution; sum it over the group (as data parallelism does) for the full dSink. A user's
implementation is checked with `rlparity check sequence-parallel --impl module:function`.
"""

from rlparity.parallel.interface import SPImplementation, get_implementation
from rlparity.parallel.launch import RankFailedError, WorkerGroup, init_from_env, launch
from rlparity.parallel.ring import attend as ring_attend
from rlparity.parallel.shard import check_shards, pad_for_world, shard
from rlparity.parallel.ulysses import attend as ulysses_attend

__all__ = ["RankFailedError", "SPImplementation", "WorkerGroup", "check_shards", "get_implementation", "init_from_env",
           "launch", "pad_for_world", "ring_attend", "shard", "ulysses_attend"]
