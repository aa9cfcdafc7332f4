"""The float64 reference: its closed-form backward against autograd, and the GPT-OSS conventions."""

import math

import pytest
import torch

from rlparity.reference import sink_attention, sink_attention_backward, visible_keys

# float64 autograd and the closed form differ only by summation order: a few ulps of values O(10).
FLOAT64_GRAD_ATOL = 1e-12

CONFIGS = {
    "mha_causal": dict(heads_q=4, heads_kv=4, seq_q=12, seq_k=12),
    "gqa4_window": dict(heads_q=8, heads_kv=2, seq_q=20, seq_k=20, window=5),
    "decode_prefix": dict(heads_q=4, heads_kv=2, seq_q=3, seq_k=11, window=4),
    "varlen": dict(heads_q=2, heads_kv=1, seq_q=13, seq_k=13, seqlens=(5, 1, 7)),
    "bidirectional_scale": dict(heads_q=2, heads_kv=2, seq_q=9, seq_k=9, causal=False, scale=0.7),
}


def _inputs(heads_q, heads_kv, seq_q, seq_k, seqlens=None, seed=0, **_):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads_q, seq_q, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, heads_kv, seq_k, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, heads_kv, seq_k, 16, generator=gen, dtype=torch.float64)
    sinks = torch.randn(heads_q, generator=gen, dtype=torch.float64) * 2
    cu = None
    if seqlens:
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, sinks, cu


def _options(config, cu):
    return {"causal": config.get("causal", True), "window": config.get("window"), "scale": config.get("scale"),
            "cu_seqlens": cu}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("through", ["dout", "dlse", "both"])
def test_closed_form_backward_matches_autograd(config, through):
    q, k, v, sinks, cu = _inputs(**config)
    opts = _options(config, cu)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, lse = sink_attention(*leaves, **opts)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64) * (through != "dlse")
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64) * (through != "dout")
    expected = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), leaves)
    got = sink_attention_backward(q, k, v, sinks, out.detach(), lse.detach(), dout, dlse, **opts)
    for name, g, e in zip(("dq", "dk", "dv", "dsinks"), got, expected):
        assert (g - e).abs().max().item() <= FLOAT64_GRAD_ATOL, name
    assert expected[3].abs().max() > 0.01, "the sink gradient must not vanish in this case"


def test_window_counts_the_current_token():
    visible = visible_keys(6, 6, window=3)
    assert visible.sum(dim=1).tolist() == [1, 2, 3, 3, 3, 3]
    assert visible[5].tolist() == [False, False, False, True, True, True]


def test_queries_are_the_last_positions_when_keys_are_longer():
    visible = visible_keys(2, 5)
    assert visible.tolist() == [[True, True, True, True, False], [True] * 5]


def test_packed_sequences_do_not_see_each_other():
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    visible = visible_keys(6, 6, cu_seqlens=cu)
    assert visible[2].tolist() == [False, False, True, False, False, False]
    assert visible[4].tolist() == [False, False, False, True, True, False]


def test_sink_is_not_scaled():
    """With q = 0 every score is 0, so P_sink = e^sigma / (n + e^sigma) whatever the scale."""
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    sigma = 1.5
    for scale in (0.1, 1.0, 10.0):
        _, lse = sink_attention(q, k, v, torch.tensor([sigma], dtype=torch.float64), causal=False, scale=scale)
        assert torch.allclose(lse, torch.full_like(lse, math.log(4 + math.exp(sigma))), atol=1e-14)


def test_a_query_that_sees_nothing_attends_only_to_the_sink():
    q, k, v, sinks, _ = _inputs(2, 2, 4, 2)
    out, lse = sink_attention(q, k, v, sinks)  # bottom-right: the first two queries see no key
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.allclose(lse[:, :, :2], sinks.reshape(1, -1, 1).expand(1, 2, 2))


@pytest.mark.parametrize("window", [None, 3])
def test_query_key_pair_is_each_sequence_alone_bottom_right(window):
    """Decode/extend batches (cu_seqlens as a (q, k) pair) equal running each sequence on its own, its queries the
    last of its keys (the unpacked bottom-right rule), concatenated."""
    queries, keys = (1, 4, 3, 1), (9, 4, 7, 1)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, sum(queries), 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, sum(keys), 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, sum(keys), 16, generator=gen, dtype=torch.float64)
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    offsets = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    cu_q, cu_k = offsets(queries), offsets(keys)
    out, lse = sink_attention(q, k, v, sinks, window=window, cu_seqlens=(cu_q, cu_k))
    for i in range(len(queries)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        alone_out, alone_lse = sink_attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], sinks, window=window)
        torch.testing.assert_close(out[:, :, qs], alone_out, rtol=0, atol=FLOAT64_GRAD_ATOL)
        torch.testing.assert_close(lse[:, :, qs], alone_lse, rtol=0, atol=FLOAT64_GRAD_ATOL)
