"""GPT-OSS experts over expert-sorted tokens, with every expert weight used in place.

The (token, slot) pairs are sorted by expert, so each expert's tokens are one contiguous block, and
each block is multiplied by a view of that expert's weights. What this avoids, per call:

- gathering weights per pair (`gate_up_proj[expert_ids]`, transformers' `batched_mm`): a
  [T*k, H, 2I] copy, k x T times one expert;
- running every token through every expert (transformers' eval path before 5.0, which copies the
  hidden states once per expert, `dense_experts` below): [E, T, H] and [E, T, 2I] activations;
- indexing the weights per expert inside autograd (transformers' `eager` experts): each
  `gate_up_proj[e]` backward allocates a zero tensor the size of all experts, once per hit expert;
- upcasting: the products run in the weights' dtype; an input of another dtype is an error, not a cast.

The backward writes each expert's weight gradient into one [E, ...] gradient tensor, the only
expert-sized allocation of the whole forward and backward. Memory is therefore independent of the
routing: every allocation is [T*k, ...] or the gradient itself. On the meta device (real-size
estimates, rlparity.memory.fake) the per-expert loop is skipped, since the output buffer it writes
into is the grouped product's only allocation.
"""

import torch

from rlparity.errors import RlparityError
from rlparity.reference.moe import SWIGLU_ALPHA, SWIGLU_LIMIT, swiglu_clamped


def _segments(counts):
    """Expert e's rows are [start, stop) of the sorted pairs; experts with no tokens are skipped."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


class GroupedLinear(torch.autograd.Function):
    """x [S, in] sorted by expert; weight [E, in, out]; bias [E, out]; counts: rows per expert -> [S, out]."""

    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        out = x.new_empty(x.shape[0], weight.shape[2])
        if counts is not None:
            for expert, start, stop in _segments(counts):
                torch.addmm(bias[expert], x[start:stop], weight[expert], out=out[start:stop])
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = grad_out.new_zeros(weight.shape[0], weight.shape[2]) if need_bias else None
        if ctx.counts is not None:  # the segments cover every row, so grad_x needs no zeroing
            for expert, start, stop in _segments(ctx.counts):
                rows = grad_out[start:stop]
                if need_x:
                    torch.mm(rows, weight[expert].T, out=grad_x[start:stop])
                if need_weight:
                    torch.mm(x[start:stop].T, rows, out=grad_weight[expert])
                if need_bias:
                    torch.sum(rows, dim=0, out=grad_bias[expert])
        return grad_x, grad_weight, grad_bias, None


def _check_dtypes(x, tensors):
    for name, tensor in tensors.items():
        if tensor.dtype != x.dtype:
            raise RlparityError(f"grouped_experts: {name} is {tensor.dtype} but the hidden states are {x.dtype}; "
                                "expected one dtype throughout (the experts are never cast, and neither is the input)")


def grouped_experts(x, expert_ids, routing_weights, gate_up_proj, gate_up_bias, down_proj, down_bias,
                    alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT):
    """x [T, H]; expert_ids, routing_weights [T, k]; gate_up_proj [E, H, 2I]; down_proj [E, I, H] -> [T, H].

    Computes rlparity.reference.moe_experts: the routing-weighted sum of each token's k experts.
    """
    _check_dtypes(x, {"gate_up_proj": gate_up_proj, "gate_up_bias": gate_up_bias, "down_proj": down_proj,
                      "down_bias": down_bias, "routing_weights": routing_weights})
    tokens, top_k = expert_ids.shape
    num_experts = gate_up_proj.shape[0]
    flat_ids = expert_ids.reshape(-1)  # [T*k]; pair p is token p // k, slot p % k
    order = torch.argsort(flat_ids, stable=True)
    counts = None
    if x.device.type != "meta":
        counts = tuple(torch.bincount(flat_ids, minlength=num_experts).tolist())
        if len(counts) != num_experts:
            raise RlparityError(f"grouped_experts: expert ids reach {len(counts) - 1}, expected ids in "
                                f"[0, {num_experts}) for gate_up_proj of shape {tuple(gate_up_proj.shape)}")
    hidden = GroupedLinear.apply(x[order // top_k], gate_up_proj, gate_up_bias, counts)  # [T*k, 2I]
    out = GroupedLinear.apply(swiglu_clamped(hidden, alpha, limit), down_proj, down_bias, counts)  # [T*k, H]
    out = out * routing_weights.reshape(-1)[order, None]
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.shape[0], device=order.device)
    return out[unsort].reshape(tokens, top_k, -1).sum(dim=1)  # [T*k, H] -> [T, k, H] -> [T, H]


def dense_experts(x, expert_ids, routing_weights, gate_up_proj, gate_up_bias, down_proj, down_bias,
                  alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT):
    """The naive counterpart: every token through every expert, weighted by zero where not routed.

    transformers' GptOssExperts ran this outside training before 5.0 (the `else` branch of its forward: the
    hidden states repeated once per expert, then batched matmuls over all experts), which is how computing
    log-probs in eval mode asked GPT-OSS for a 180 GiB allocation. Kept to show it fails its ceiling.
    """
    tokens, hidden_size = x.shape
    num_experts = gate_up_proj.shape[0]
    dense_weights = routing_weights.new_zeros(tokens, num_experts).scatter(1, expert_ids, routing_weights)  # [T, E]
    repeated = x.repeat(num_experts, 1).view(num_experts, tokens, hidden_size)  # [E, T, H]
    hidden = torch.bmm(repeated, gate_up_proj) + gate_up_bias[:, None, :]  # [E, T, 2I]
    out = torch.bmm(swiglu_clamped(hidden, alpha, limit), down_proj) + down_bias[:, None, :]  # [E, T, H]
    return (out * dense_weights.T[..., None]).sum(dim=0)
