"""The benchmark's FLOP counts come from exactly the pairs the reference's mask lets through."""

import pytest
import torch

from rlparity.attention.flops import attention_flops, visible_pairs
from rlparity.reference import visible_keys


@pytest.mark.parametrize(("seq_q", "seq_k", "causal", "window", "seqlens"), [
    (37, 37, True, None, None),
    (37, 37, True, 8, None),
    (5, 40, True, 9, None),
    (40, 5, True, None, None),
    (30, 30, False, 6, None),
    (30, 30, False, None, None),
    (20, 20, True, 4, (7, 1, 12)),
])
def test_visible_pairs_counts_the_reference_mask(seq_q, seq_k, causal, window, seqlens):
    cu = None if seqlens is None else torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    mask = visible_keys(seq_q, seq_k, causal=causal, window=window, cu_seqlens=cu)
    assert visible_pairs(seq_q, seq_k, causal=causal, window=window, seqlens=seqlens) == int(mask.sum())


def test_closed_forms_at_gpt_oss_sizes():
    seq, window = 8192, 128
    assert visible_pairs(seq, seq) == seq * (seq + 1) // 2
    assert visible_pairs(seq, seq, window=window) == window * (window + 1) // 2 + (seq - window) * window
    forward = attention_flops(1, 64, seq, seq, 64)
    assert forward == 4 * 64 * 64 * seq * (seq + 1) // 2
    assert attention_flops(1, 64, seq, seq, 64, backward=True) == forward * 7 // 2
