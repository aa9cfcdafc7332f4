"""Bad input to sequence-parallel attention, and ranks that crash or hang, end in an error that says
which rank and what was expected, quickly, without hanging the caller.

The functions at the top run on every rank of a worker group (they are imported there by name).
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from rlparity.errors import RlparityError
from rlparity.parallel.interface import SPImplementation
from rlparity.parallel.launch import FAILURE_GRACE_S, RankFailedError, WorkerGroup
from rlparity.reference import sink_attention

pytestmark = pytest.mark.multi_process

WORLD = 2
HEAD_DIM = 8
# Well above FAILURE_GRACE_S plus starting a group, far below the 60 s a stuck collective would take.
PROMPT_FAILURE_S = 15.0


def attend_on_rank(scheme, *, heads_q=4, heads_kv=2, seqs=(8, 8), sinks_shapes=((4,), (4,)),
                   sinks_dtype=torch.float32, cu_seqlens=None, inner="reference"):
    """Rank r attends a shard of seqs[r] tokens with sinks of shape sinks_shapes[r]; returns its lse sum."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, heads_q, seqs[rank], HEAD_DIM, generator=gen)
    k = torch.randn(1, heads_kv, seqs[rank], HEAD_DIM, generator=gen)
    v = torch.randn(1, heads_kv, seqs[rank], HEAD_DIM, generator=gen)
    sinks = torch.randn(sinks_shapes[rank], generator=gen).to(sinks_dtype)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    out, lse = SPImplementation(scheme, inner).load()(q, k, v, sinks, causal=True, cu_seqlens=cu)
    return float(lse.sum())


def kernel_failing_on_rank1(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """The reference kernel, except that rank 1 raises on the block of keys it receives from rank 0."""
    if dist.get_rank() == 1 and not causal:
        raise RuntimeError("injected failure on rank 1")
    return sink_attention(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)


def ring_forward_backward(inner):
    rank = dist.get_rank()
    q, k, v = (torch.randn(1, 2, 8, HEAD_DIM, requires_grad=True) for _ in range(3))
    sinks = torch.zeros(2, requires_grad=True)
    out, lse = SPImplementation("ring", inner).load()(q, k, v, sinks)
    out.sum().backward()
    return rank


def exit_on_rank1():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def rank1_skips_a_collective():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))


def rank1_sleeps(seconds):
    if dist.get_rank() == 1:
        time.sleep(seconds)


@pytest.fixture(scope="module")
def group():
    with WorkerGroup(WORLD, backend="gloo") as workers:
        yield workers


@pytest.mark.parametrize("scheme", ["ulysses", "ring"])
@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"seqs": (5, 4)},
                 r"rank 1 received q of shape \(1, 4, 4, 8\), rank 0 of shape \(1, 4, 5, 8\), expected the same shape "
                 r"on every rank: a sequence of 9 tokens does not split into 2 equal shards; pad it to 10",
                 id="sequence_not_divisible"),
    pytest.param({"sinks_shapes": ((4,), (2,))}, r"rank 1 received sinks of shape \(2,\), expected \(4,\)",
                 id="sinks_shape_on_rank1"),
    pytest.param({"sinks_shapes": ((4, 1), (4, 1))}, r"rank 0 received sinks of shape \(4, 1\), expected \(4,\)",
                 id="sinks_shape_everywhere"),
    pytest.param({"sinks_dtype": torch.int64},
                 r"rank 0 received sinks of dtype torch.int64, expected a floating-point dtype", id="sinks_dtype"),
    pytest.param({"cu_seqlens": (0, 3, 10)}, r"cu_seqlens ends at 10 tokens, expected 16", id="cu_seqlens_total"),
])
def test_bad_input_raises_on_every_rank_naming_the_rank(group, scheme, kwargs, message):
    with pytest.raises(RlparityError, match=message) as excinfo:
        group.run(attend_on_rank, scheme, **kwargs)
    assert excinfo.value.kind == "raised"
    assert group.alive  # every rank raised the same input error before any attention: the group is reusable


def test_ulysses_names_the_slice_a_rank_should_use(group):
    with pytest.raises(RlparityError, match=r"rank 1 received sinks of shape \(8,\), expected \(4,\): one logit per "
                                            r"query head; every rank passes all 4 and uses its slice \(heads 2\.\.3\)"):
        group.run(attend_on_rank, "ulysses", sinks_shapes=((4,), (8,)))


def test_ulysses_rejects_heads_not_divisible_by_world(group):
    with pytest.raises(RlparityError, match=r"Ulysses: rank 0 received q of shape \(1, 3, 8, 8\): its 3 heads do not "
                                            r"divide by the world size 2, expected a multiple of 2 heads"):
        group.run(attend_on_rank, "ulysses", heads_q=3, heads_kv=1, sinks_shapes=((3,), (3,)))
    # Ring attention keeps every head on every rank, so the same input is fine there.
    assert len(group.run(attend_on_rank, "ring", heads_q=3, heads_kv=1, sinks_shapes=((3,), (3,)))) == WORLD


def test_a_rank_that_raises_mid_ring_ends_the_run_with_its_traceback():
    start = time.monotonic()
    workers = WorkerGroup(WORLD, backend="gloo")
    try:
        with pytest.raises(RankFailedError) as excinfo:
            workers.run(ring_forward_backward, f"{__name__}:kernel_failing_on_rank1")
    finally:
        workers.close()
    error = excinfo.value
    assert (error.rank, error.kind) == (1, "raised")
    assert "rank 1 of 2 raised RlparityError" in str(error) or "rank 1 of 2 raised RuntimeError" in str(error)
    assert "injected failure on rank 1" in str(error)
    assert "--- traceback of rank 1 ---" in str(error) and "kernel_failing_on_rank1" in error.remote_traceback
    assert "rank(s) 0 still running" in str(error)  # rank 0 waited in the ring for rank 1 and was ended
    assert not workers.alive
    assert time.monotonic() - start < PROMPT_FAILURE_S


def test_a_rank_that_dies_is_reported_with_its_exit_code():
    start = time.monotonic()
    with WorkerGroup(WORLD, backend="gloo") as workers:
        with pytest.raises(RankFailedError, match=r"rank 1 of 2 exited with code 3") as excinfo:
            workers.run(exit_on_rank1)
        assert excinfo.value.kind == "exited" and not workers.alive
    assert time.monotonic() - start < PROMPT_FAILURE_S


def test_a_stuck_collective_fails_after_the_process_group_timeout():
    collective_timeout_s = 2.0
    start = time.monotonic()
    with WorkerGroup(WORLD, backend="gloo", collective_timeout_s=collective_timeout_s) as workers:
        with pytest.raises(RankFailedError, match=r"rank 0 of 2 raised") as excinfo:
            workers.run(rank1_skips_a_collective)
    elapsed = time.monotonic() - start
    assert excinfo.value.kind == "raised"
    assert collective_timeout_s <= elapsed < PROMPT_FAILURE_S


def test_a_rank_that_hangs_outside_collectives_hits_the_task_timeout():
    start = time.monotonic()
    with WorkerGroup(WORLD, backend="gloo", task_timeout_s=1.0) as workers:
        with pytest.raises(RankFailedError, match=r"rank 1 of 2 did not finish rank1_sleeps within 1 s") as excinfo:
            workers.run(rank1_sleeps, 60.0)
        assert excinfo.value.kind == "timed out" and not workers.alive
    assert time.monotonic() - start < PROMPT_FAILURE_S
    assert FAILURE_GRACE_S < PROMPT_FAILURE_S
