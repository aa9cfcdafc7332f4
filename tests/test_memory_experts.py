"""The grouped experts equal transformers' GPT-OSS experts, forward and backward, without their memory.

Exact: rlparity.reference.moe_experts in float64 on the same (dtype-rounded) weights and inputs.
Naive: transformers' GptOssExperts with its eager implementation (a loop over experts), in the
candidate's dtype. The rule: candidate error <= k x naive error + the rounding floor.
"""

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP

from rlparity.errors import RlparityError
from rlparity.memory import TrackedMeter
from rlparity.metrics import K_BACKWARD, K_FORWARD, max_abs_error, rounding_floor, tolerance
from rlparity.ops import grouped_experts
from rlparity.ops.experts import dense_experts
from rlparity.ops.hf import EXPERTS_IMPLEMENTATION, register_experts
from rlparity.reference.moe import moe_block, moe_experts

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 40, 32, 48, 8, 2
WEIGHT_STD = 0.5  # expert pre-activations of a few units: both sides of the SwiGLU clamp are exercised
PARAMETERS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def _config(implementation):
    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS,
                          num_experts_per_tok=TOP_K)
    register_experts()
    config._experts_implementation = implementation
    return config


def _experts(implementation, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = GptOssExperts(_config(implementation))
    with torch.no_grad():
        for name in PARAMETERS:
            getattr(experts, name).copy_(torch.randn(getattr(experts, name).shape, generator=g) * WEIGHT_STD)
    return experts.to(dtype)


def _routing(seed, skewed=False):
    """Expert ids [T, k] (distinct per token) and softmax routing weights; `skewed` leaves half the experts idle."""
    g = torch.Generator().manual_seed(seed)
    pool = EXPERTS // 2 if skewed else EXPERTS
    ids = torch.stack([torch.randperm(pool, generator=g)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=g), dim=-1)
    return ids, weights


def _run(forward, x, ids, weights, tensors):
    """(output, gradients of x, routing weights and the four expert tensors) for a random upstream gradient.

    `tensors` are used as they are when they are leaves requiring grad (a module's parameters), else as copies.
    """
    leaves = [t if t.is_leaf and t.requires_grad else t.detach().requires_grad_() for t in (x, weights, *tensors)]
    out = forward(leaves[0], ids, leaves[1], *leaves[2:])
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves)
    return (out, *grads)


NAMES = ("out", "d_x", "d_routing_weights", "d_gate_up_proj", "d_gate_up_proj_bias", "d_down_proj", "d_down_proj_bias")


@pytest.mark.parametrize("candidate", [grouped_experts, dense_experts], ids=["grouped", "dense_naive"])
@pytest.mark.parametrize("skewed", [False, True], ids=["all_experts", "idle_experts"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_experts_within_the_tolerance_rule(candidate, dtype, skewed):
    """The grouped experts, and the dense naive ones the conformance suite shows failing their ceiling."""
    naive_module = _experts("eager", dtype)
    tensors = [getattr(naive_module, name).detach() for name in PARAMETERS]
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3)).to(dtype)
    ids, weights = _routing(seed=4, skewed=skewed)
    weights = weights.to(dtype)

    def reference(x, ids, weights, *tensors):
        return moe_experts(x, ids, weights, *tensors)

    exact = _run(reference, x.double(), ids, weights.double(), [t.double() for t in tensors])
    naive = _run(lambda x, ids, weights, *_: naive_module(x, ids, weights), x, ids, weights,
                 [getattr(naive_module, name) for name in PARAMETERS])
    result = _run(candidate, x, ids, weights, tensors)
    for name, c, e, n in zip(NAMES, result, exact, naive):
        assert c.dtype == dtype, f"{name}: {c.dtype}, expected {dtype} (no upcast)"
        k = K_FORWARD if name == "out" else K_BACKWARD
        error, naive_error = max_abs_error(c, e), max_abs_error(n, e)
        allowed = tolerance(naive_error, rounding_floor(e, dtype), k)
        assert error <= allowed, f"{name}: error {error:.3g} > {k} x naive {naive_error:.3g} + floor = {allowed:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_registered_with_transformers_the_mlp_agrees_with_its_eager_experts(dtype):
    torch.manual_seed(0)
    eager = GptOssMLP(_config("eager"))
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.normal_(std=WEIGHT_STD)
    grouped = GptOssMLP(_config(EXPERTS_IMPLEMENTATION))
    grouped.load_state_dict(eager.state_dict())
    eager, grouped = eager.to(dtype), grouped.to(dtype)
    x = torch.randn(2, TOKENS // 2, HIDDEN).to(dtype)
    out_eager, scores_eager = eager(x)
    out_grouped, scores_grouped = grouped(x)
    assert torch.equal(scores_eager, scores_grouped)  # the same router: the same routing
    p = {name: t.detach().double() for name, t in eager.named_parameters()}
    exact, _, _ = moe_block(x.double(), p["router.weight"], p["router.bias"], TOP_K, p["experts.gate_up_proj"],
                            p["experts.gate_up_proj_bias"], p["experts.down_proj"], p["experts.down_proj_bias"])
    error, naive_error = max_abs_error(out_grouped, exact), max_abs_error(out_eager, exact)
    assert error <= tolerance(naive_error, rounding_floor(exact, dtype), K_FORWARD)


def _tracked_peak(ids, weights):
    module = _experts("eager", torch.float32)
    tensors = [getattr(module, name).detach().requires_grad_() for name in PARAMETERS]
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    with TrackedMeter() as meter:
        with meter.phase("forward"):
            out = grouped_experts(x, ids, weights, *tensors)
        with meter.phase("backward"):
            out.sum().backward()
    return meter.report().phase_peak


def test_memory_does_not_depend_on_the_routing():
    balanced = _tracked_peak(*_routing(seed=4))
    skewed_ids = torch.zeros(TOKENS, TOP_K, dtype=torch.long)
    skewed_ids[:, 1] = 1  # every token to experts 0 and 1
    assert _tracked_peak(skewed_ids, _routing(seed=4)[1]) == balanced


def test_mixed_dtypes_and_bad_ids_are_errors():
    module = _experts("eager", torch.bfloat16)
    tensors = [getattr(module, name) for name in PARAMETERS]
    ids, weights = _routing(seed=4)
    with pytest.raises(RlparityError, match="gate_up_proj is torch.bfloat16 but the hidden states are torch.float32"):
        grouped_experts(torch.zeros(TOKENS, HIDDEN), ids, weights, *tensors)
    with pytest.raises(RlparityError, match=r"expert ids reach 8, expected ids in \[0, 8\)"):
        grouped_experts(torch.zeros(TOKENS, HIDDEN, dtype=torch.bfloat16), ids.clamp(max=0) + EXPERTS,
                        weights.bfloat16(), *tensors)
