"""rlparity's fused sink-attention kernel in Triton: forward and backward behind the backend signature.

Forward: online softmax over key blocks with the sink opening the normaliser (m = sigma, l = 1), so the
sink enters Z exactly once; returns out (input dtype) and lse (float32).
Backward (FlashAttention-2 structure, recomputing P from the base-2 lse the forward saves):
  1. preprocess: delta_i = dO_i.O_i - dLSE_i per query row, and per (batch, head, query block) partial
     sums of dsink_h = -sum_i P_sink,i delta_i, summed here in torch: a fixed-order reduction, so dSink
     is deterministic (no atomics anywhere);
  2. dK, dV: one program per (key block, kv head) loops over every query head of its GQA group, so the
     group sum happens in registers, without atomics;
  3. dQ: one program per (query block, query head).
Blocks with no visible (query, key) pair under the causal / window / packing rules are skipped by the
loop bounds; blocks fully visible run without a mask.

Inputs may be float32, bfloat16 or float16; the kernel accumulates in float32. float64 input is refused
(an error names the `reference` backend): Triton's tl.dot has no float64 tensor-core path and an fp64
flash kernel would only duplicate the reference. float32 matmuls run in IEEE precision, not TF32.
On CPU the kernels run under Triton's interpreter, which must be switched on with TRITON_INTERPRET=1
before the kernels are defined (when rlparity.attention.triton_sink_kernels is first imported).
"""

import functools
import math
import os
import sys
from dataclasses import dataclass

import torch

from rlparity.attention.contract import check_inputs, refuse_query_key_pair
from rlparity.attention.registry import AVAILABLE
from rlparity.errors import RlparityError
from rlparity.reference.attention import default_scale

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# head_dim is padded to a power of two >= 16 (tl.dot's smallest tile); above 128 the [128, D] tiles of the
# CUDA configuration would not fit in registers.
MIN_BLOCK_D = 16
MAX_HEAD_DIM = 128
# Compute capability 8.0 (Ampere) is where Triton's tl.dot has bfloat16 tensor-core support.
MIN_CUDA_CAPABILITY = (8, 0)
INTERPRET_HINT = (
    "set TRITON_INTERPRET=1 in the environment before Python starts (Triton reads it when the kernels are "
    "defined), e.g. `TRITON_INTERPRET=1 pytest conformance`"
)


@dataclass(frozen=True)
class BlockConfig:
    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    preprocess_m: int
    fwd_warps: int = 4
    fwd_stages: int = 1
    bwd_warps: int = 4
    bwd_stages: int = 1

    def __post_init__(self):
        for name in ("fwd_m", "fwd_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n", "preprocess_m"):
            size = getattr(self, name)
            if size < MIN_BLOCK_D or size & (size - 1):
                raise RlparityError(f"BlockConfig.{name}: expected a power of two >= {MIN_BLOCK_D} "
                                    f"(tl.arange and tl.dot tiles), got {size}")


def block_config(device: torch.device, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> BlockConfig:
    """Tile sizes per device (on CUDA: per compute capability, head_dim and dtype, `cuda_block_config`).

    CPU (interpreter): every tile costs a fixed Python overhead, but small tiles keep the masked-off waste
    low on the small shapes the CPU suites use and make their loops run several blocks.
    """
    if device.type == "cuda":
        return cuda_block_config(torch.cuda.get_device_capability(device), head_dim, dtype)
    return BlockConfig(fwd_m=16, fwd_n=32, dkdv_m=16, dkdv_n=32, dq_m=16, dq_n=32, preprocess_m=64)


def cuda_block_config(capability: tuple[int, int], head_dim: int, dtype: torch.dtype) -> BlockConfig:
    """The shapes of FlashAttention-2 in Triton (large query tiles in the forward and dQ, large key tiles
    in dK/dV, software-pipelined), compiled for sm80 and sm90 within shared memory; float32 tiles are
    halved, as its IEEE FMA dots hold twice the bytes per element. Hopper with head_dim <= 64 (GPT-OSS)
    runs the tiles benchmarks/tune_triton_blocks.py measured fastest on an H100 (seq 8k, causal, bf16):
    forward 64 x 64 tiles in 2 stages, 1.34 ms against 1.45 ms for 128 x 64 in 3; dQ 64 x 32, 6.55 ms
    forward+backward against 6.85 ms (benchmarks/results/h100-2026-11-26/). Other shapes are untuned.
    """
    if dtype == torch.float32:
        return BlockConfig(fwd_m=64, fwd_n=32, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=32, preprocess_m=128,
                           fwd_warps=4, fwd_stages=2, bwd_warps=4, bwd_stages=2)
    if head_dim <= 64:
        if capability[0] == 9:
            return BlockConfig(fwd_m=64, fwd_n=64, dkdv_m=32, dkdv_n=128, dq_m=64, dq_n=32, preprocess_m=128,
                               fwd_warps=4, fwd_stages=2, bwd_warps=4, bwd_stages=3)
        return BlockConfig(fwd_m=128, fwd_n=64, dkdv_m=32, dkdv_n=128, dq_m=128, dq_n=32, preprocess_m=128,
                           fwd_warps=4, fwd_stages=3, bwd_warps=4, bwd_stages=3)
    return BlockConfig(fwd_m=128, fwd_n=64, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=32, preprocess_m=128,
                       fwd_warps=8, fwd_stages=3, bwd_warps=4, bwd_stages=2)


def probe(device: torch.device) -> str:
    try:
        import triton
    except ImportError as exc:
        return f"triton is not importable ({exc}); install it with `pip install triton` (or rlparity[triton])"
    device = torch.device(device)
    if device.type == "cpu":
        if not _interpreter_on(triton):
            return f"the triton backend runs on CPU only under Triton's interpreter: {INTERPRET_HINT}"
        return _interpreter_check()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch; the triton backend needs a GPU or TRITON_INTERPRET=1 on CPU"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CUDA_CAPABILITY:
            return (f"the triton backend needs CUDA compute capability >= {MIN_CUDA_CAPABILITY[0]}."
                    f"{MIN_CUDA_CAPABILITY[1]} for bfloat16 tl.dot, got {capability[0]}.{capability[1]}")
        if _interpreter_on(triton):
            return "TRITON_INTERPRET=1 is set, so the kernels run in the interpreter on CPU tensors only; unset it"
        return AVAILABLE
    return f"the triton backend supports cpu (interpreted) and cuda devices, got {device.type}"


def _interpreter_on(triton_module) -> bool:
    """Whether our kernels are (or, if not yet defined, will be) interpreted."""
    kernels = sys.modules.get("rlparity.attention.triton_sink_kernels")
    if kernels is not None:
        return kernels.INTERPRETED
    knobs = getattr(triton_module, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _interpreter_check() -> str:
    """Whether this triton's interpreter runs the kernels' loop pattern, tried once on a one-program kernel.

    triton 3.6's interpreter turns a computed loop bound into an int with int() of a one-element numpy
    array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); every
    kernel here would fail with that deep inside the interpreter.
    """
    import numpy
    import triton

    out = torch.zeros(1)
    try:
        _kernels()._interpreter_check[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure means the kernels cannot run here; the reason says which
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels' loops with numpy "
                f"{numpy.__version__} ({type(exc).__name__}: {exc}); triton 3.6's interpreter needs numpy < 2.4: "
                f"`pip install 'numpy<2.4'`, or use a newer triton (3.9 works)")
    if out.item() != 3.0:
        return (f"Triton {triton.__version__}'s interpreter counted a 3-step loop as {out.item()}; "
                f"its results cannot be trusted with numpy {numpy.__version__}")
    return AVAILABLE


def _kernels():
    from rlparity.attention import triton_sink_kernels

    return triton_sink_kernels


def _check_supported(q, k, v, sinks, kernels):
    where = "triton sink attention"
    if q.dtype not in SUPPORTED_DTYPES:
        hint = " (use the `reference` backend for float64)" if q.dtype == torch.float64 else ""
        raise RlparityError(f"{where}: expected q of dtype float32, bfloat16 or float16, got {q.dtype}{hint}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise RlparityError(f"{where}: expected head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.device.type == "cpu" and not kernels.INTERPRETED:
        raise RlparityError(f"{where}: CPU tensors need Triton's interpreter: {INTERPRET_HINT}")
    if q.device.type == "cpu" and (reason := _interpreter_check()) != AVAILABLE:
        raise RlparityError(f"{where}: {reason}")
    if q.device.type == "cuda" and kernels.INTERPRETED:
        raise RlparityError(f"{where}: TRITON_INTERPRET=1 is set, so the kernels accept CPU tensors only; "
                            f"got CUDA tensors. Unset TRITON_INTERPRET to run natively")


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid_rows(rows, block, batch, cu_seqlens, heads):
    """Launch grid (blocks of `rows`, heads, batch); packed input: blocks of its longest sequence, per sequence."""
    if cu_seqlens is None:
        return (max(1, _cdiv(rows, block)), heads, batch)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return (max(1, _cdiv(longest, block)), heads, cu_seqlens.numel() - 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_precision(dtype):
    # IEEE float32 products for float32 inputs: TF32 would lose 13 mantissa bits and fail float32 checks.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, sinks, causal, window, scale, cu_seqlens, kernels, cfg):
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(lse)
    if q.numel() == 0:
        return out, lse, lse2
    grid = _grid_rows(seq_q, cfg.fwd_m, batch, cu_seqlens, heads_q)
    kernels._fwd_kernel[grid](
        q, k, v, sinks, out, lse, lse2, cu_seqlens,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        seq_q, seq_k, heads_q // heads_kv, scale * kernels.LOG2E, window or 0,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n,
        CAUSAL=causal, HAS_WINDOW=window is not None, IS_VARLEN=cu_seqlens is not None,
        EMULATE_BF16=kernels.INTERPRETED and q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse, lse2


def _backward(q, k, v, sinks, out, lse2, dout, dlse, causal, window, scale, cu_seqlens, kernels, cfg):
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    groups = heads_q // heads_kv
    block_d = _block_d(head_dim)
    varlen = cu_seqlens is not None
    emulate = kernels.INTERPRETED and q.dtype == torch.bfloat16
    precision = _dot_precision(q.dtype)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros_like(sinks)

    delta = torch.empty_like(lse2)
    pre_blocks = _cdiv(seq_q, cfg.preprocess_m)
    dsink_partials = torch.empty(batch, heads_q, pre_blocks, dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_arg = dlse if has_dlse else lse2  # never read when HAS_DLSE is False
    kernels._bwd_preprocess[(pre_blocks, heads_q, batch)](
        out, dout, dlse_arg, lse2, sinks, delta, dsink_partials,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dlse_arg.stride(0), dlse_arg.stride(1), dlse_arg.stride(2), lse2.stride(0), lse2.stride(1),
        seq_q, heads_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.preprocess_m, HAS_DLSE=has_dlse,
    )
    dsinks = dsink_partials.sum(dim=(0, 2)).to(sinks.dtype)

    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=window is not None,
                  IS_VARLEN=varlen, EMULATE_BF16=emulate, DOT_PRECISION=precision,
                  num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    strides_in = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    kernels._bwd_dkdv_kernel[_grid_rows(seq_k, cfg.dkdv_n, batch, cu_seqlens, heads_kv)](
        q, k, v, dout, lse2, delta, dk, dv, cu_seqlens, *strides_in,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse2.stride(0), lse2.stride(1),
        seq_q, seq_k, groups, scale * kernels.LOG2E, scale, window or 0,
        BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, GROUP_PARTIALS=q.dtype == torch.float32, **common,
    )
    kernels._bwd_dq_kernel[_grid_rows(seq_q, cfg.dq_m, batch, cu_seqlens, heads_q)](
        q, k, v, dout, lse2, delta, dq, cu_seqlens, *strides_in,
        dq.stride(0), dq.stride(1), dq.stride(2), lse2.stride(0), lse2.stride(1),
        seq_q, seq_k, groups, scale * kernels.LOG2E, scale, window or 0,
        BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, **common,
    )
    return dq, dk, dv, dsinks


def _block_d(head_dim: int) -> int:
    return max(MIN_BLOCK_D, 1 << (head_dim - 1).bit_length())


class TritonSinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, window, scale, cu_seqlens, cfg):
        kernels = _kernels()
        out, lse, lse2 = _forward(q, k, v, sinks, causal, window, scale, cu_seqlens, kernels, cfg)
        ctx.save_for_backward(q, k, v, sinks, out, lse2, cu_seqlens)
        ctx.options = (causal, window, scale, cfg)
        ctx.set_materialize_grads(False)  # lets the backward skip the dLSE path when lse is unused
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse2, cu_seqlens = ctx.saved_tensors
        causal, window, scale, cfg = ctx.options
        if dout is None and dlse is None:
            return (None,) * 9
        dout = torch.zeros_like(out) if dout is None else _unit_last_stride(dout)
        dq, dk, dv, dsinks = _backward(q, k, v, sinks, out, lse2, dout, dlse, causal, window, scale, cu_seqlens,
                                       _kernels(), cfg)
        return dq, dk, dv, dsinks, None, None, None, None, None


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, config=None):
    """(out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] float32): the contract in DESIGN.md.

    `config` overrides the tile sizes of `block_config(device, head_dim, dtype)`, e.g. for a benchmark.
    """
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens,
                 where="triton sink attention")
    refuse_query_key_pair(cu_seqlens, "triton", "its varlen kernels align each sequence's queries with its keys")
    kernels = _kernels()
    _check_supported(q, k, v, sinks, kernels)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise RlparityError(f"triton sink attention: expected a finite scale, got {scale}")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    config = block_config(q.device, q.shape[-1], q.dtype) if config is None else config
    return TritonSinkAttention.apply(q, k, v, sinks.contiguous(), bool(causal), window, scale, cu_seqlens, config)
