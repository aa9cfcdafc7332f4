"""Sequence-parallel sink attention over torch.distributed (Ulysses and ring), and how to launch it.

    from rlparity.parallel import ring_attend, ulysses_attend
    out, lse = ulysses_attend(q_shard, k_shard, v_shard, sinks, causal=True, window=128, inner="chunked")

Both keep the attention contract on each rank's sequence shard (layout: rlparity.parallel.shard);
the inner kernel is any registered backend. The gradient each rank gets for the replicated `sinks`
is its own contribution; sum it over the group (as data parallelism does) for the full dSink.
"""

from rlparity.parallel.launch import RankFailedError, WorkerGroup, init_from_env, launch
from rlparity.parallel.ring import attend as ring_attend
from rlparity.parallel.shard import pad_for_world, shard
from rlparity.parallel.ulysses import attend as ulysses_attend

__all__ = ["RankFailedError", "WorkerGroup", "init_from_env", "launch", "pad_for_world", "ring_attend", "shard",
           "ulysses_attend"]
