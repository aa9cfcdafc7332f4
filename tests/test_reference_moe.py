"""The reference GPT-OSS MoE block against transformers' GptOssMLP with the same random weights."""

import pytest
import torch

from rlparity.reference import moe_block, swiglu_clamped

# Both run in float64; the routed sums differ only in order.
FLOAT64_ATOL = 1e-12


@pytest.fixture
def mlp():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)
    module = GptOssMLP(config).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():  # non-zero routers: transformers initialises them to zero
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.5)
    return module


def test_moe_block_matches_transformers(mlp):
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    expected, expected_scores = mlp(x)
    router, experts = mlp.router, mlp.experts
    got, weights, expert_ids = moe_block(
        x, router.weight, router.bias, router.top_k, experts.gate_up_proj, experts.gate_up_proj_bias,
        experts.down_proj, experts.down_proj_bias,
    )
    _, _, hf_ids = router(x.reshape(-1, 32))
    assert torch.equal(expert_ids, hf_ids)
    assert (got - expected).abs().max().item() <= FLOAT64_ATOL
    assert (weights - expected_scores).abs().max().item() <= FLOAT64_ATOL


def test_swiglu_clamps_gate_above_and_up_both_ways():
    gate_up = torch.tensor([[100.0, 100.0, -100.0, -100.0]], dtype=torch.float64)  # (gate, up) pairs
    out = swiglu_clamped(gate_up)
    limit, alpha = 7.0, 1.702
    glu = limit * torch.sigmoid(torch.tensor(alpha * limit, dtype=torch.float64))
    assert torch.allclose(out[0, 0], (limit + 1) * glu)
    # gate is not clamped below: a very negative gate gives ~0, whatever up is
    assert out[0, 1].abs() < 1e-60
