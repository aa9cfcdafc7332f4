"""Routing agreement and the near-tie census on hand-made routes, where every count is known."""

import math

import pytest
import torch

from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.routing.agreement import coarser_dtype, compare_routing
from rlparity.routing.census import LARGE_GAP_ROUNDINGS, gap_bins, large_gap_threshold, rounding_scale, topk_gaps

# Token 0: gap (2nd - 3rd logit) 1e-7, a rounding-level near-tie in float32. Token 1: gap 1.0.
# Token 2: gap 0.5, with a 1st/2nd order that side b may swap without changing the set.
LOGITS = torch.tensor([[2.0, 1.0, 1.0 - 1e-7, -1.0],
                       [3.0, 2.0, 1.0, 0.0],
                       [1.0, 0.9, 0.4, 0.0]], dtype=torch.float64)
IDS = torch.tensor([[0, 1], [0, 1], [0, 1]])


def routing(ids_per_layer, logits=LOGITS):
    return Routing(expert_ids=list(ids_per_layer), router_logits=[logits] * len(ids_per_layer))


def test_identical_routes_agree_fully():
    comparison = compare_routing([routing([IDS, IDS])], [routing([IDS, IDS])], dtype=torch.float32)
    assert comparison.identical and comparison.flips == 0 and comparison.differ_any_layer == 0
    assert [layer.set_agreement for layer in comparison.layers] == [1.0, 1.0]
    assert comparison.layers[0].max_logit_diff == 0.0


# Side b's logits where rounding swapped token 0's near-tie: b's ids [0, 2] are the top-2 of these.
ROUNDED = LOGITS.clone()
ROUNDED[0, 1], ROUNDED[0, 2] = LOGITS[0, 2], LOGITS[0, 1]


def test_flip_at_a_near_tie_is_rounding_and_a_flip_at_a_large_gap_is_a_bug():
    near_tie = torch.tensor([[0, 2], [0, 1], [0, 1]])
    large = torch.tensor([[0, 1], [0, 2], [0, 1]])
    comparison = compare_routing([routing([IDS, IDS])], [routing([near_tie, large], ROUNDED)], dtype=torch.float32,
                                 names=("exact", "candidate"))
    first, second = comparison.layers
    assert (first.flips, first.large_gap_flips, first.inconsistent_flips) == (1, 0, 0)
    assert (second.flips, second.large_gap_flips, second.inconsistent_flips) == (1, 1, 1)
    assert first.median_gap_at_flips == pytest.approx(1e-7, rel=1e-6)
    assert comparison.differ_any_layer == pytest.approx(2 / 3)
    assert comparison.flagged_examples == [{"layer": 1, "sequence": 0, "position": 1, "gap": 1.0,
                                            "why": "large gap and inconsistent", "exact": [0, 1],
                                            "candidate": [0, 2]}]
    assert [(b.low, b.high, b.flips) for b in first.bins if b.flips] == [(0.0, 1e-6, 1)]


def test_a_flip_the_reported_logits_cannot_produce_is_inconsistent_and_an_exact_tie_is_not():
    tied = LOGITS.clone()
    tied[0, 2] = tied[0, 1]  # token 0: experts 1 and 2 exactly tied; either choice is the top-2
    near_tie = torch.tensor([[0, 2], [0, 1], [0, 1]])
    tie_broken_differently = compare_routing([routing([IDS], tied)], [routing([near_tie], tied)],
                                             dtype=torch.float32).layers[0]
    assert (tie_broken_differently.flips, tie_broken_differently.inconsistent_flips) == (1, 0)
    # Same logits on both sides, gap 1e-7: small for float32 rounding, but b did not route by its logits.
    same_logits = compare_routing([routing([IDS])], [routing([near_tie])], dtype=torch.float32).layers[0]
    assert (same_logits.large_gap_flips, same_logits.inconsistent_flips) == (0, 1)


def test_order_only_difference_keeps_the_set():
    swapped = torch.tensor([[0, 1], [0, 1], [1, 0]])
    layer = compare_routing([routing([IDS])], [routing([swapped])], dtype=torch.float32).layers[0]
    assert layer.set_agreement == 1.0 and layer.flips == 0
    assert layer.order_agreement == pytest.approx(2 / 3)


def test_gaps_and_thresholds():
    assert topk_gaps(LOGITS, 2).tolist() == pytest.approx([1e-7, 1.0, 0.5])
    norms = torch.linalg.vector_norm(LOGITS, dim=-1)
    assert rounding_scale(LOGITS, torch.float32).tolist() == pytest.approx((norms * 2.0 ** -24).tolist())
    ratio = large_gap_threshold(LOGITS, torch.bfloat16) / large_gap_threshold(LOGITS, torch.float32)
    assert ratio.tolist() == pytest.approx([2.0 ** 16] * 3)  # bf16 keeps 8 significant bits, fp32 24
    assert large_gap_threshold(LOGITS, torch.float32)[0] == pytest.approx(LARGE_GAP_ROUNDINGS * norms[0] * 2.0 ** -24)
    assert coarser_dtype(torch.float64, torch.bfloat16, torch.float32) == torch.bfloat16


def test_gap_bins_count_every_token_once():
    gaps = torch.tensor([0.0, 5e-7, 3e-3, 0.2, 7.0], dtype=torch.float64)
    bins = gap_bins(gaps, torch.tensor([True, False, True, False, False]))
    assert sum(b.tokens for b in bins) == 5 and sum(b.flips for b in bins) == 2
    assert bins[-1].high == math.inf and bins[-1].tokens == 1


@pytest.mark.parametrize("change, message", [
    (lambda b: b[:1], "has 2 sequences"),
    (lambda b: [routing([IDS]), b[1]], "a has 2 layers, b has 1"),
    (lambda b: [routing([IDS[:2], IDS[:2]], LOGITS[:2]), b[1]], "a expert ids (3, 2), b (2, 2)"),
])
def test_mismatched_sides_are_refused(change, message):
    a = [routing([IDS, IDS]), routing([IDS, IDS])]
    with pytest.raises(RlparityError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare_routing(a, change(list(a)), dtype=torch.float32, names=("a", "b"))


def test_routes_without_logits_on_either_side_are_refused():
    bare = [Routing(expert_ids=[IDS])]
    with pytest.raises(RlparityError, match="neither a nor b reports router logits"):
        compare_routing(bare, bare, dtype=torch.float32, names=("a", "b"))
