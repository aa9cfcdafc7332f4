"""How sequence-parallel work maps onto ranks, checked in one process against the reference's masks:
ring blocks, Ulysses' kv heads and sink slices, padding, and both schemes on a world of one."""

import random

import pytest
import torch

from rlparity.errors import RlparityError
from rlparity.parallel import pad_for_world, ring_attend, shard, ulysses_attend
from rlparity.parallel.blocks import plan_block, ring_steps
from rlparity.parallel.ulysses import kv_replication, sinks_slice
from rlparity.reference import sink_attention, visible_keys

RANDOM_LAYOUTS = 300


def _cu(offsets):
    return None if offsets is None else torch.tensor(offsets, dtype=torch.int32)


def planned_cover(total, world, causal, window, offsets):
    """[total, total] count of how many planned calls cover each (query, key) pair as visible."""
    size = total // world
    cover = torch.zeros(total, total, dtype=torch.int64)
    for rank in range(world):
        for source in range(world):
            call = plan_block((rank * size, rank * size + size), (source * size, source * size + size),
                              causal=causal, window=window, cu_seqlens=offsets)
            if call is None:
                continue
            rows, keys = call.queries, call.keys
            mask = visible_keys(rows.stop - rows.start, keys.stop - keys.start, causal=call.causal, window=call.window,
                                cu_seqlens=_cu(call.cu_seqlens))
            assert mask.any(dim=1).all(), "a planned call holds a query row with no visible key"
            if causal and window is not None:
                assert (rank - source) % world <= ring_steps(world, size, causal=causal, window=window)
            q0, k0 = rank * size + rows.start, source * size + keys.start
            cover[q0:q0 + mask.shape[0], k0:k0 + mask.shape[1]] += mask.long()
    return cover


def random_layouts(seed=0):
    rng = random.Random(seed)
    for _ in range(RANDOM_LAYOUTS):
        world, size = rng.choice([1, 2, 3, 4]), rng.randint(1, 10)
        total = world * size
        offsets = None
        if rng.random() < 0.5 and total > 1:
            cuts = sorted(rng.sample(range(1, total), rng.randint(0, min(5, total - 1))))
            offsets = (0, *cuts, *cuts[-1:], total)  # repeating the last cut makes an empty sequence
        yield world, total, rng.random() < 0.7, rng.choice([None, 1, 2, rng.randint(1, total + 3)]), offsets


def test_ring_blocks_cover_exactly_the_visible_pairs_once():
    for world, total, causal, window, offsets in random_layouts():
        cover = planned_cover(total, world, causal, window, offsets)
        expected = visible_keys(total, total, causal=causal, window=window, cu_seqlens=_cu(offsets)).long()
        assert torch.equal(cover, expected), (world, total, causal, window, offsets)


def test_the_ring_stops_where_the_window_ends():
    assert ring_steps(4, 24, causal=True, window=37) == 2  # keys 48 positions back are still in reach
    assert ring_steps(4, 24, causal=True, window=1) == 0
    assert ring_steps(4, 24, causal=True, window=None) == 3
    assert ring_steps(4, 24, causal=False, window=5) == 3


@pytest.mark.parametrize("heads_q, heads_kv, world",
                         [(8, 2, 4), (8, 2, 2), (8, 8, 4), (12, 6, 4), (8, 1, 8), (6, 3, 2)])
def test_ulysses_gives_each_rank_the_kv_heads_its_query_heads_read(heads_q, heads_kv, world):
    copies = kv_replication(heads_kv, world)
    kv_per_rank = heads_kv * copies // world
    assert heads_kv * copies % world == 0
    for rank in range(world):
        heads = range(heads_q)[sinks_slice(heads_q, world, rank)]
        local_group = len(heads) // kv_per_rank
        for local, head in enumerate(heads):
            replica = rank * kv_per_rank + local // local_group  # the kv head the inner kernel pairs it with
            assert replica // copies == head // (heads_q // heads_kv), (rank, head)


def _inputs(batch, heads_q, heads_kv, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, heads_kv, seq, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(heads_q, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("batch, causal, offsets", [(2, True, None), (1, True, (0, 4, 11)), (1, False, None),
                                                    (1, False, (0, 9, 11))])
def test_padding_to_the_world_size_leaves_the_real_tokens_unchanged(batch, causal, offsets):
    q, k, v, sinks = _inputs(batch, 4, 2, 11)
    expected = sink_attention(q, k, v, sinks, causal=causal, window=3, cu_seqlens=_cu(offsets))
    q_p, k_p, v_p, cu_p, pad = pad_for_world(q, k, v, 4, cu_seqlens=_cu(offsets), causal=causal)
    assert (q_p.shape[2], pad) == (12, 1)
    out, lse = sink_attention(q_p, k_p, v_p, sinks, causal=causal, window=3, cu_seqlens=cu_p)
    torch.testing.assert_close((out[:, :, :11], lse[:, :, :11]), expected, rtol=0, atol=1e-12)


def test_padding_bidirectional_batches_is_refused():
    q, k, v, _ = _inputs(2, 4, 2, 11)
    with pytest.raises(RlparityError, match="bidirectional input with batch 2 cannot be padded"):
        pad_for_world(q, k, v, 4, causal=False)


def test_sharding_an_uneven_sequence_is_refused():
    with pytest.raises(RlparityError, match="11 tokens do not split into 4 equal shards"):
        shard(torch.zeros(1, 2, 11, 8), 4, 0)


@pytest.mark.parametrize("attend", [ulysses_attend, ring_attend], ids=["ulysses", "ring"])
def test_a_world_of_one_is_the_inner_kernel_without_a_process_group(attend):
    q, k, v, sinks = (t.requires_grad_() for t in _inputs(1, 4, 2, 13, seed=1))
    cu = _cu((0, 5, 13))
    out, lse = attend(q, k, v, sinks, window=4, cu_seqlens=cu, inner="reference")
    expected = sink_attention(q, k, v, sinks, window=4, cu_seqlens=cu)
    torch.testing.assert_close((out, lse), expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sinks))
    expected_grads = torch.autograd.grad(expected[0].sum() + expected[1].sum(), (q, k, v, sinks))
    torch.testing.assert_close(grads, expected_grads, rtol=0, atol=1e-12)
