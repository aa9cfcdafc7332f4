"""Per-module memory of one GPT-OSS forward and backward, counted op by op.

For each module call on T tokens (S = T k token-expert pairs; b bytes per compute element; float32 4,
int64 8) a `Footprint` gives:

    saved           what autograd keeps for the backward (each op keeps only what its backward reads:
                    RoPE's products keep cos and sin, not q; top-k keeps its indices, not the logits)
    forward_extra   bytes beyond `saved` at the module's forward peak (temporaries, its output)
    backward_extra  bytes beyond `saved` at its backward peak, counting the tensors of `saved` already
                    freed there as negative, and its own parameter gradients as they appear
    gradients       its parameter gradients, in the compute dtype

The counts were read from transformers' GPT-OSS (modeling_gpt_oss.py, 5.x), rlparity.ops and
rlparity.attention.chunked, and checked byte for byte against the tracker (rlparity.memory.tracker)
at tiny scale on CPU and at GPT-OSS-20B/120B scale on the meta device (tests/test_memory_analytic.py,
conformance/test_memory_ceilings.py). Saved tensors, per call:

    norm        T (4H + 4 + 4H + bH)        float32 copy of x, rsqrt, normalised x, output in the compute dtype
    attention   T (b (3 Hq + 2 Hkv) D + 4 Hq)
                q and k after RoPE, v, the kernel's output and its contiguous copy for o_proj, and one
                float32 row per query (lse); eager attention instead keeps q, and k and v repeated to Hq
                heads, its output, the int64 argmax of the sink-shifted logits and the probabilities:
                T (4 b Hq D + 8 Hq) + b Hq T (T + 1)
    router      T k (8 + b)                 top-k indices, softmax of the top-k logits
    experts     S (24 + b (2H + 7I + 1))    three int64 permutations, the gathered tokens, the [S, 2I]
                                            projection, five [S, I] SwiGLU intermediates, the [S, H] expert
                                            output and the routing weight per pair
    log-prob    chunked: 4T (the entropy); naive: 8 T V (float32 log-softmax and its exponential)
"""

from dataclasses import dataclass

from rlparity.errors import RlparityError
from rlparity.memory.dims import (
    BOOL_BYTES,
    FP32_BYTES,
    INT_BYTES,
    Dims,
    attention_parameters,
    experts_parameters,
    router_parameters,
)

CHUNKED_BLOCK = 64  # rlparity.attention.chunked.BLOCK_K, the key tile of the chunked backend


@dataclass(frozen=True)
class KernelFootprint:
    """The buffers a fused sink-attention kernel allocates, per (batch, query head, query) row."""

    name: str
    forward_fp32_rows: int  # float32 rows allocated by the forward, lse included
    saved_fp32_rows: int  # of those, kept for the backward
    backward_fp32_rows: int  # float32 rows of backward workspace (delta, lse in base 2, ...)
    backward_fp32_dq: bool  # a float32 [B, Hq, S, D] dQ accumulator in the backward


ATTENTION_KERNELS = {
    # rlparity.attention.triton_sink: forward lse and lse2 (saved); backward delta; dq/dk/dv in the input dtype.
    "triton": KernelFootprint("triton", forward_fp32_rows=2, saved_fp32_rows=1, backward_fp32_rows=1,
                              backward_fp32_dq=False),
    # flash_attn_interface (hopper): forward softmax_lse (saved); backward softmax_d, lse_log2 and dq_accum.
    "fa3": KernelFootprint("fa3", forward_fp32_rows=1, saved_fp32_rows=1, backward_fp32_rows=2,
                           backward_fp32_dq=True),
    # flash_attn.cute: as FA3 (lse saved; dq_accum, dpsum and lse_log2 in the backward).
    "fa4": KernelFootprint("fa4", forward_fp32_rows=1, saved_fp32_rows=1, backward_fp32_rows=2,
                           backward_fp32_dq=True),
}
# "eager": transformers' eager attention; "chunked": rlparity's torch online softmax; then the fused kernels.
ATTENTION_PATHS = ("eager", "chunked", *ATTENTION_KERNELS)


def check_attention(attention: str) -> str:
    if attention not in ATTENTION_PATHS:
        raise RlparityError(f"no memory model for attention {attention!r}: expected one of "
                            f"{', '.join(ATTENTION_PATHS)}")
    return attention


@dataclass(frozen=True)
class Footprint:
    kind: str
    saved: int
    forward_extra: int
    backward_extra: int
    gradients: int


def norm(d: Dims, t: int, b: int) -> Footprint:
    # forward besides: the mean and the float32 product with the weight before the cast
    # backward besides: five [T, H] float32 temporaries, the input gradient and the weight's
    return Footprint("norm", saved=t * (2 * FP32_BYTES * d.hidden + FP32_BYTES + b * d.hidden),
                     forward_extra=t * (FP32_BYTES * d.hidden + FP32_BYTES),
                     backward_extra=t * d.hidden * (5 * FP32_BYTES + b) + b * d.hidden, gradients=b * d.hidden)


def _eager_attention(d: Dims, t: int, b: int, o_grads: int, own_grads: int) -> Footprint:
    hq, hkv, dim = d.heads_q, d.heads_kv, d.head_dim
    scores = b * hq * t * (t + 1)  # [Hq, T, T + 1]: the sink is a column
    saved = t * (4 * b * hq * dim + INT_BYTES * hq) + scores
    # forward peak: scores + mask ([Hq, T, T]), the sink concatenation and the max-shifted logits ([Hq, T, T + 1]
    # each) with q, k and v repeated, the argmax and the max, k before repetition and v, before the softmax
    at_peak = (t * (3 * b * hq * dim + INT_BYTES * hq) + b * hq * t * t + 2 * scores + 2 * b * t * hkv * dim
               + b * hq * t)
    # backward peak: the softmax's backward, the max's zeros and its scatter (3 scores) and the max's gradient,
    # once the probabilities (1 score), v repeated and the contiguous output ([Hq, T, D] each) are freed and the
    # gradient of P took one [Hq, T, D]
    return Footprint("attention", saved, forward_extra=max(at_peak - saved, b * t * d.hidden),
                     backward_extra=2 * scores + b * hq * t - b * t * hq * dim + o_grads, gradients=own_grads)


def attention(d: Dims, t: int, b: int, path: str) -> Footprint:
    hq, hkv, dim = d.heads_q, d.heads_kv, d.head_dim
    own_grads = b * attention_parameters(d)
    o_grads = b * (hq * dim + 1) * d.hidden  # o_proj's: the only gradients made before the kernel's backward
    if check_attention(path) == "eager":
        return _eager_attention(d, t, b, o_grads, own_grads)
    qkv = b * t * (hq + 2 * hkv) * dim  # q, k after RoPE and v
    row = FP32_BYTES * hq * t  # one float32 value per (query head, token)
    o_proj_input_grad = b * t * hq * dim
    output = b * t * d.hidden  # o_proj's output, until the residual add
    saved = qkv + 2 * b * t * hq * dim + row
    if path == "chunked":
        block = CHUNKED_BLOCK
        positions = t * (block * BOOL_BYTES + 2 * INT_BYTES)  # a visibility tile, query and key positions
        # forward peak in the key-block loop: four float32 [Hq, T, D] accumulators (acc, acc * correction, P V in
        # float32, their sum), two float32 [Hq, T, block] tiles (scores, P) and four float32 rows
        loop = FP32_BYTES * hq * t * (4 * dim + 2 * block) + 4 * row + positions
        # backward: float32 dQ, dK, dV; four float32 tiles (scores, P, dP, P (dP - D + dlse)) and two in the
        # input dtype (dS; P while dV accumulates); dlse's zeros and D
        backward = (FP32_BYTES * t * dim * (hq + 2 * hkv) + hq * t * block * (4 * FP32_BYTES + 2 * b) + 2 * row
                    + positions + o_proj_input_grad + o_grads)
        return Footprint("attention", saved, forward_extra=max(qkv + loop - saved, output), backward_extra=backward,
                         gradients=own_grads)
    kernel = ATTENTION_KERNELS[path]
    # backward: dQ, dK, dV in the input dtype, zeros for the unused lse's gradient, the kernel's float32 workspace
    workspace = row * (1 + kernel.backward_fp32_rows) + (FP32_BYTES * hq * t * dim if kernel.backward_fp32_dq else 0)
    return Footprint("attention", saved,
                     forward_extra=max(row * (kernel.forward_fp32_rows - kernel.saved_fp32_rows), output),
                     backward_extra=qkv + workspace + o_proj_input_grad + o_grads, gradients=own_grads)


def router(d: Dims, t: int, b: int) -> Footprint:
    # forward besides: the [T, E] logits and the top-k values; backward: top-k's [T, E] scatter, the input
    # gradient, the router's own gradients
    own_grads = b * router_parameters(d)
    return Footprint("router", saved=t * d.top_k * (INT_BYTES + b), forward_extra=b * t * (d.experts + d.top_k),
                     backward_extra=b * t * (d.experts + d.hidden) + own_grads, gradients=own_grads)


def experts(d: Dims, t: int, b: int) -> Footprint:
    """rlparity.ops.grouped_experts (and transformers' grouped_mm, which saves the same).

    Forward besides: the weighted expert outputs, their unsorted copy ([S, H] each) and the [T, H] sum.
    The backward runs in three stages, each freeing saved tensors before the next allocates:
      0. unsorting: the slot sum's [S, H] gradient made contiguous, the gather's zeros and its scatter
         ([S, H] each), every saved tensor alive;
      1. down projection and SwiGLU: the expert output, routing weights and a permutation freed; the [S, I]
         input gradient, an [S, I] SwiGLU temporary and the down projection's gradients live;
      2. gate/up projection: only the gathered tokens and a permutation still saved; the [S, 2I] gradient
         (two buffers while the interleaved gate and up slices' gradients are summed, or one and the
         gate/up weights' gradients), the [S, H] input gradient and the down projection's gradients live.
    """
    s, h, inter = t * d.top_k, d.hidden, d.intermediate
    saved = s * (3 * INT_BYTES + b * (2 * h + 7 * inter + 1))
    own_grads = b * experts_parameters(d)
    down_grads = b * d.experts * h * (inter + 1)
    stage0 = 3 * b * s * h
    stage1 = -(b * s * h + b * s + INT_BYTES * s) + b * s + 2 * b * s * inter + down_grads
    still_saved = b * s * h + INT_BYTES * s
    stage2 = (still_saved - saved) + b * s * 2 * inter + down_grads + max(b * s * 2 * inter,
                                                                          b * s * h + own_grads - down_grads)
    return Footprint("experts", saved, forward_extra=b * (2 * s * h + t * h),
                     backward_extra=max(stage0, stage1, stage2), gradients=own_grads)


def layer(d: Dims, t: int, b: int, path: str) -> list[Footprint]:
    """A decoder layer's modules in forward order; the residual sum comes after index LAYER_ATTENTION."""
    return [norm(d, t, b), attention(d, t, b, path), norm(d, t, b), router(d, t, b), experts(d, t, b)]


LAYER_ATTENTION = 1


def layer_saved(d: Dims, t: int, b: int, path: str) -> dict[str, int]:
    """Module kind -> bytes one decoder layer's forward leaves for its backward."""
    saved: dict[str, int] = {}
    for module in layer(d, t, b, path):
        saved[module.kind] = saved.get(module.kind, 0) + module.saved
    return saved


def logprob(d: Dims, t: int, b: int, chunk: int | None) -> Footprint:
    """The log-prob pass over t tokens (rlparity.ops.logprobs); gradients: the lm head's."""
    v, h = d.vocab, d.hidden
    lm_grad = b * v * h
    if chunk is None:
        # forward besides: the float32 logits (divided by the temperature) and p log p; backward besides: three
        # float32 [T, V] gradients (of p log p's factors and of the log-softmax), before the lm head's backward
        full = FP32_BYTES * t * v
        return Footprint("logprob", saved=2 * full, forward_extra=2 * full, backward_extra=3 * full,
                         gradients=lm_grad)
    c = min(chunk, t)
    # forward besides: a chunk's float32 logits and log-softmax, the log-prob output. backward: the hidden
    # states' gradient, the float32 weight-gradient accumulator, then a chunk's log-softmax and probabilities
    # (the logits' gradient is built in place in the former) or, at the end, the accumulator's cast
    return Footprint("logprob", saved=FP32_BYTES * t, forward_extra=2 * FP32_BYTES * c * v + FP32_BYTES * (t + c),
                     backward_extra=(b * t * h + FP32_BYTES * v * h
                                     + max(2 * FP32_BYTES * c * v + INT_BYTES * c, lm_grad)),
                     gradients=lm_grad)
