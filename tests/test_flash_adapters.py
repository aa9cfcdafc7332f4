"""The FlashAttention adapters' own code (layouts, window convention, packing, lse layout) on CPU.

The builds need an sm90 GPU, so each is replaced by a stand-in that implements the semantics their
docstrings state ([batch, seq, heads, dim] layout; query i sees keys i + sk - sq - left .. i + sk - sq +
right; lse [batch, heads, seq], packed [heads, total]), with the sink added to the normaliser. The
adapter, given the contract's arguments, must then reproduce the float64 reference exactly. What the real
kernels compute is the GPU conformance suite's job.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch

from rlparity.attention import flash
from rlparity.metrics import rounding_floor
from rlparity.reference import sink_attention

# Stand-in and reference are both float64 einsum/matmul: they differ only in summation order.
FLOAT64_ATOL = 1e-12

CASES = {
    "causal": dict(batch=2, seq_q=12, seq_k=12),
    "window": dict(batch=1, seq_q=20, seq_k=20, window=5),
    "decode_prefix": dict(batch=2, seq_q=3, seq_k=15, window=6),
    "bidirectional_window": dict(batch=1, seq_q=10, seq_k=10, window=4, causal=False),
    "varlen_window": dict(batch=1, seq_q=17, seq_k=17, window=4, seqlens=(6, 1, 10)),
}


def _one_sequence(q, k, v, sink, scale, causal, left, right):
    """FlashAttention's documented semantics on one sequence: q [Sq, H, D], k, v [Sk, Hkv, D]."""
    seq_q, seq_k = q.shape[0], k.shape[0]
    if causal:
        right = 0
    i = torch.arange(seq_q)[:, None] + seq_k - seq_q
    j = torch.arange(seq_k)[None, :]
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink_column = sink.to(scores.dtype).reshape(-1, 1, 1).expand(-1, seq_q, 1)
    lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)  # [H, Sq]
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), v)
    return out, lse


def _batched(q, k, v, sink, scale, causal, left, right):
    outs, lses = zip(*(_one_sequence(q[b], k[b], v[b], sink, scale, causal, left, right) for b in range(q.shape[0])))
    return torch.stack(outs), torch.stack(lses)  # [B, S, H, D], [B, H, S]


def _packed(q, k, v, cu_q, cu_k, sink, scale, causal, left, right):
    outs, lses = [], []
    for start_q, stop_q, start_k, stop_k in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        out, lse = _one_sequence(q[start_q:stop_q], k[start_k:stop_k], v[start_k:stop_k], sink, scale, causal,
                                 left, right)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)  # [total, H, D], [H, total]


def _none_to_minus_one(value):
    return -1 if value is None else value


def fa3_module():
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), return_attn_probs=False,
                        s_aux=None):
        out, lse = _batched(q, k, v, s_aux, softmax_scale, causal, *window_size)
        return (out, lse) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                               causal=False, window_size=(-1, -1), return_attn_probs=False, s_aux=None):
        out, lse = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, s_aux, softmax_scale, causal, *window_size)
        return (out, lse) if return_attn_probs else out

    return SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def vllm_module():
    def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None,
                               softmax_scale=None, causal=False, window_size=None, return_softmax_lse=False,
                               fa_version=2, s_aux=None):
        assert fa_version == 3 and s_aux.dtype == torch.float32
        left, right = (-1, -1) if window_size is None else window_size
        out, lse = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, s_aux, softmax_scale, causal, left, right)
        return (out, lse) if return_softmax_lse else out

    return SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def fa4_module():
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        return_lse=False):
        assert learnable_sink.dtype == torch.bfloat16
        return _batched(q, k, v, learnable_sink, softmax_scale, causal, *map(_none_to_minus_one, window_size))

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                               return_lse=False):
        assert learnable_sink.dtype == torch.bfloat16
        return _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, learnable_sink, softmax_scale, causal,
                       *map(_none_to_minus_one, window_size))

    return SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


ADAPTERS = {
    "fa3": (flash.attend_fa3, "_fa3_module", fa3_module),
    "vllm_fa3": (flash.attend_vllm_fa3, "_vllm_module", vllm_module),
    "fa4": (flash.attend_fa4, "_fa4_module", fa4_module),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_maps_the_contract_onto_flash_attention(monkeypatch, adapter, case):
    attend, module_getter, fake = ADAPTERS[adapter]
    monkeypatch.setattr(flash, module_getter, fake)
    monkeypatch.setattr(flash, "_check_build_limits", lambda q, where: None)
    config = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    heads_q, heads_kv, head_dim = 4, 2, 8
    q = torch.randn(config["batch"], heads_q, config["seq_q"], head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(config["batch"], heads_kv, config["seq_k"], head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(config["batch"], heads_kv, config["seq_k"], head_dim, generator=gen, dtype=torch.float64)
    # Representable in bfloat16, the narrowest sink dtype a build takes (FA4), so no adapter rounds it.
    sinks = torch.randn(heads_q, generator=gen).to(torch.bfloat16).double()
    cu = None
    if "seqlens" in config:
        cu = torch.tensor([0, *torch.tensor(config["seqlens"]).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = dict(causal=config.get("causal", True), window=config.get("window"), scale=0.4, cu_seqlens=cu)
    out, lse = attend(q, k, v, sinks, **kwargs)
    expected_out, expected_lse = sink_attention(q, k, v, sinks, **kwargs)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out - expected_out).abs().max() <= FLOAT64_ATOL
    # lse comes back in float32, as the contract asks of every 16-bit build.
    assert (lse.double() - expected_lse).abs().max() <= rounding_floor(expected_lse, torch.float32)


def test_stand_ins_take_the_argument_names_the_probes_look_for():
    assert flash._sink_parameter(fa3_module().flash_attn_func) == "s_aux"
    assert "s_aux" in inspect.signature(vllm_module().flash_attn_varlen_func).parameters
    assert "learnable_sink" in inspect.signature(fa4_module().flash_attn_func).parameters
