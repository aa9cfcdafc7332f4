"""SGLang's Triton attention kernels with sinks, called as SGLang's Triton attention backend calls them for GPT-OSS.

Backends (the installed `sglang` package's own kernels, `sglang.kernels.ops.attention`):
- `sglang_p1_extend`, `sglang_p16_extend`: `extend_attention_fwd(..., sinks=...)`, new tokens on cached prefixes
  (chunked prefill), a full prefill when the prefix is empty, and one-token extends. Each sequence's prefix keys
  sit in the token pool; its new keys go in as k_extend / v_extend (and into the pool, as SGLang saves them
  before the kernel runs). Returns (out, lse): the kernel writes the lse (natural log, sink included) when the
  caller passes `lse_extend`; SGLang's GPT-OSS path does not ask for it (only its decode-context-parallel path
  does), and the rest of the kernel is the same either way.
- `sglang_p1_decode`, `sglang_p16_decode`: `decode_attention_fwd(..., sinks=...)`, one query per sequence:
  stage 1 splits each sequence's keys into KV splits and writes per-split (out, lse) to attn_logits /
  attn_lse; stage 2 merges the splits and adds the sink to the normaliser once. Cases where a sequence has
  more than one query are skipped (NotImplementedError). Returns (out, None): stage 2 stores no lse.
Forward only (SGLang's kernels have no backward); float32, bfloat16 and float16, bfloat16 on a GPU only: Triton's
interpreter gets bfloat16 arithmetic wrong (INTERPRETER_BF16), so on the CPU those cells are skipped.

How SGLang 0.5.23 calls them (srt/layers/attention/triton_backend.py, srt/models/gpt_oss.py), and so do we:
- KV cache: one token pool per layer, k_buffer / v_buffer [pool_slots, heads_kv, head_dim] in the model
  dtype. A sequence's tokens live at scattered slots (rlparity.attention.paged): pages of `page_size`
  consecutive slots in a shuffled page order (slot = page * page_size + offset), page 0 left unused as SGLang
  reserves it; unused slots hold NaN so a read of a wrong slot shows. kv_indices (int64) lists a sequence's
  slots, kv_indptr (int32) the offsets into it, qo_indptr (int64) the query offsets. page_size is passed to
  the kernels, which then address the pool by page and offset (the PAGE_SIZE > 1 branch) instead of by slot.
- sm_scale: ours (default head_dim ** -0.5, GPT-OSS's `scaling`); k_scale = v_scale = 1.0; no logit cap.
- window: GPT-OSS's model sets sliding_window_size = config.sliding_window - 1 (our window w: a query at p
  sees p - w < j <= p). For such a layer the backend reads a window "rail" instead of the full kv_indices:
  the last min(L, w - 1) slots, with L = the prefix length (extend) or the sequence length including the
  current token (decode) (`update_sliding_window_buffer`). The extend kernel masks further with
  q <= kv + (w - 1), positions counted from the rail's start. The decode kernel has no mask: it reads the
  rail as it is. w = 1 would be sliding_window_size 0, which SGLang's kernels read as "no window" (skipped).
- sinks: GPT-OSS's model holds them as a bfloat16 parameter on this backend (float32 only for trtllm_mha);
  the kernels load them and compute in float32. bfloat16 cases pass them in bfloat16, as SGLang does;
  float32 and float16 cases pass them in float32, so that the kernel sees the very values the reference
  sees (rounding them to bfloat16 would be the model loader's doing, not the kernel's).
- decode KV splits: max_kv_splits = 8 (`--triton-attention-num-kv-splits`); num_kv_splits per sequence
  from SGLang's `get_num_kv_splits`: on a device with no core count (this CPU) every sequence gets
  max_kv_splits, on CUDA its Triton heuristic `get_num_kv_splits_triton` with the SM count.

Which path each case takes (from the kernels' own launch code):
- decode: heads_q == heads_kv would take `_fwd_kernel_stage1` (BLOCK_N 64); every decode case is GQA and
  takes `_fwd_grouped_kernel_stage1` (BLOCK_N 32, up to 16 query heads a program), then `_fwd_kernel_stage2`,
  which merges the splits and adds the sink. A sequence of L keys (its rail under a window) in S splits is cut
  into chunks of ceil(ceil(L / S) / 32) * 32 keys (`splits_used`). Splits filled per sequence:
      case                  keys (rail)            CPU (S = 8)    CUDA, 132 SMs (S from the heuristic)
      decode_batch          37, 5, 16, 17          2, 1, 1, 1     2, 1, 1, 1    (S = 8, 1, 4, 4)
      decode_long           300, 1030              5, 7           3, 7          (S = 3, 8)
      decode_batch_window   15, 5, 15, 15          1 each         1 each
      window_edge_query     15                     1              1
  so decode_batch and decode_long run the split-KV reduce over several partial results.
- extend: `_fwd_kernel`, BLOCK_M x BLOCK_N = 64 x 64 on the CPU (SGLang's choice for a device it does not
  know; 128 x 64 on an H100), a loop over the prefix (the pool, through kv_indices) then over the new tokens
  (causal mask, window mask). Query blocks per sequence: one (<= 64 new tokens) except beyond_window (80: two);
  prefix loops run up to 17 blocks (decode_long, 1029 cached keys).

Finding (SGLang 0.5.23): on a sliding-window layer the Triton backend's decode reads only the last
window - 1 keys (update_sliding_window_buffer caps the decode rail at sliding_window_size = window - 1 while the
query's own key is already in it), so each decode step past the window drops the oldest key the window holds:
GPT-OSS decodes with a 127-token window where its prefill (this backend's extend, FlashInfer, FA3) uses 128.
`window_edge_query` (one query, 17 keys, window 16) is the smallest matrix case that shows it; given `window`
keys (`attend_decode(..., window_keys=window)`) the same kernel passes. Upstream: sgl-project/sglang#32087.

Triton runs on the CPU only under its interpreter: TRITON_INTERPRET=1 before the kernels are imported.
"""

import functools
import math
import os
import sys

import torch

from rlparity.attention.contract import check_inputs
from rlparity.attention.paged import TokenBatch, paged_layout, scatter_to_pages, token_batch
from rlparity.attention.registry import AVAILABLE
from rlparity.errors import RlparityError
from rlparity.reference.attention import default_scale

SGLANG_VERSION_TESTED = "0.5.23"
INSTALL_HINT = (
    f"`pip install --no-deps sglang=={SGLANG_VERSION_TESTED} triton orjson psutil pybase64 requests packaging "
    "pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp` (its kernels only; `nox -s engine_kernels` "
    "builds that environment)"
)
INTERPRET_HINT = "set TRITON_INTERPRET=1 before Python starts (Triton reads it when the kernels are defined)"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Measured with triton 3.9: a bfloat16 product or tl.dot in the interpreter is off by ~1e10 (or NaN).
INTERPRETER_BF16 = (
    "Triton's interpreter keeps bfloat16 as raw uint16 and multiplies the bit patterns (tl.dot and elementwise "
    "products; triton-lang/triton#11584), and SGLang's kernels compute in bfloat16: their bfloat16 cells run on "
    "a GPU (`nox -s gpu_conformance`)"
)
# --triton-attention-num-kv-splits, SGLang's default: the size of attn_logits' split axis.
MAX_KV_SPLITS = 8
# The decode kernels round each split's length up to a multiple of this (decode_attention._MIN_BLOCK_KV).
MIN_BLOCK_KV = 32
# GPT-OSS's sinks parameter dtype on SGLang's Triton backend (srt/models/gpt_oss.py).
SGLANG_SINK_DTYPE = torch.bfloat16
_EXTEND_KERNEL = "sglang.kernels.ops.attention.extend_attention"
_DECODE_KERNEL = "sglang.kernels.ops.attention.decode_attention"
_SPLITS_KERNEL = "sglang.kernels.ops.attention.metadata"


# ------------------------------------------------------------------------------------------------ probe


def probe(device: torch.device) -> str:
    """AVAILABLE, or what to install or set so that SGLang's Triton kernels run on `device`."""
    device = torch.device(device)
    try:
        import triton
    except ImportError as exc:
        return f"triton is not importable ({exc}); install SGLang's kernels: {INSTALL_HINT}"
    if device.type == "cpu" and not _interpreted(triton):
        return f"SGLang's Triton kernels run on CPU only under Triton's interpreter: {INTERPRET_HINT}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch; SGLang's Triton kernels need a GPU or TRITON_INTERPRET=1 on CPU"
        if _interpreted(triton):
            return "TRITON_INTERPRET=1 is set, so SGLang's kernels run in the interpreter on CPU tensors only; unset it"
    elif device.type != "cpu":
        return f"SGLang's Triton kernels run on cpu (interpreted) and cuda devices here, got {device.type}"
    return _import_reason()


@functools.cache
def _import_reason() -> str:
    try:
        _kernels()
    except Exception as exc:  # noqa: BLE001 - the import error is the reason, whatever it is
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"SGLang's Triton kernels are not importable ({type(exc).__name__}: {first}); {INSTALL_HINT}"
    return AVAILABLE


def _interpreted(triton_module) -> bool:
    knobs = getattr(triton_module, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernels():
    """(extend_attention_fwd, decode_attention_fwd, get_num_kv_splits_triton, get_device_core_count)."""
    import importlib

    extend = importlib.import_module(_EXTEND_KERNEL)
    decode = importlib.import_module(_DECODE_KERNEL)
    splits = importlib.import_module(_SPLITS_KERNEL)
    from sglang.srt.utils import get_device_core_count

    return extend.extend_attention_fwd, decode.decode_attention_fwd, splits.get_num_kv_splits_triton, \
        get_device_core_count


def _token_pool(batch: TokenBatch, page_size: int):
    """(k_buffer, v_buffer, req_to_token): every sequence's keys at scattered slots of SGLang's token pool.

    rlparity.attention.paged hands out pages of `page_size` slots in a shuffled order (page 0, so slot 0, stays
    unused as SGLang's allocator reserves it); unused slots hold NaN. SGLang's pool is token-major,
    [pool_slots, heads_kv, head_dim], with slot = page * page_size + offset. req_to_token[i] is the slot of each
    of sequence i's positions.
    """
    layout = paged_layout(batch.k_lens, page_size, device=batch.k.device)
    k_buffer = scatter_to_pages(batch.k, layout).flatten(0, 1)
    v_buffer = scatter_to_pages(batch.v, layout).flatten(0, 1)
    return k_buffer, v_buffer, layout.slot_mapping.split(batch.k_lens)


def _kv_rails(slots, lengths, sliding_window_size: int, device):
    """(kv_indptr int32, kv_indices int64) over the first `lengths[i]` slots of each sequence; for a window layer
    (sliding_window_size > -1) the last min(length, sliding_window_size) of them, as SGLang's
    update_sliding_window_buffer takes them."""
    rails = []
    for row, length in zip(slots, lengths):
        taken = length if sliding_window_size < 0 else min(length, sliding_window_size)
        rails.append(row[length - taken : length])
    lens = torch.tensor([0] + [r.numel() for r in rails], dtype=torch.int32)
    kv_indptr = torch.cumsum(lens, 0).to(torch.int32).to(device)
    return kv_indptr, torch.cat(rails).to(torch.int64).to(device)


def _sinks(sinks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return sinks.to(SGLANG_SINK_DTYPE if dtype == SGLANG_SINK_DTYPE else torch.float32).contiguous()


def _sliding_window_size(window: int | None) -> int:
    """GPT-OSS's convention in SGLang: config.sliding_window - 1; -1 means no window."""
    if window is None:
        return -1
    if window == 1:
        raise NotImplementedError("window 1 is sliding_window_size 0 in SGLang, which its kernels read as "
                                  "no window at all")
    return window - 1


def _check(q, k, v, sinks, window, cu_seqlens, where, causal=True, scale=None):
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where=where)
    if q.dtype not in SUPPORTED_DTYPES:
        raise RlparityError(f"{where}: expected q of dtype float32, bfloat16 or float16, got {q.dtype}")
    if q.device.type == "cpu" and "triton" in sys.modules and not _interpreted(sys.modules["triton"]):
        raise RlparityError(f"{where}: CPU tensors need Triton's interpreter: {INTERPRET_HINT}")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise NotImplementedError(INTERPRETER_BF16)


# ------------------------------------------------------------------------------------------------ extend


@torch.no_grad()
def attend_extend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, page_size=1):
    """extend_attention_fwd on every case whose queries are the last tokens of their sequences."""
    where = f"sglang extend (page size {page_size})"
    _check(q, k, v, sinks, window, cu_seqlens, where, causal, scale)
    if not causal and window is not None:
        raise NotImplementedError("SGLang's non-causal extend applies a window on both sides of the query; "
                                  "the contract's window is one-sided")
    extend_attention_fwd = _kernels()[0]
    batch = token_batch(q, k, v, cu_seqlens)
    k_buffer, v_buffer, req_to_token = _token_pool(batch, page_size)
    q_lens, k_lens = batch.q_lens, batch.k_lens
    prefix_lens = [k_len - q_len for q_len, k_len in zip(q_lens, k_lens)]
    sliding_window_size = _sliding_window_size(window)
    kv_indptr, kv_indices = _kv_rails(req_to_token, prefix_lens, sliding_window_size, q.device)
    # the new tokens' keys: the last q_len of each sequence's keys (SGLang saves them to the pool too)
    new_rows = torch.cat([torch.arange(end - q_len, end) for q_len, end in zip(q_lens, batch.cu_k[1:].tolist())])
    k_extend = batch.k[new_rows.to(q.device)].contiguous()
    v_extend = batch.v[new_rows.to(q.device)].contiguous()
    o_extend = torch.full_like(batch.q, float("nan"))
    lse_extend = torch.full(batch.q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    extend_attention_fwd(
        batch.q, k_extend, v_extend, o_extend, k_buffer, v_buffer,
        batch.cu_q.to(torch.int64),  # qo_indptr
        kv_indptr, kv_indices,
        None,  # custom_mask
        causal,  # is_causal
        None,  # mask_indptr
        max(q_lens),  # max_len_extend
        1.0, 1.0,  # k_scale, v_scale
        sm_scale=default_scale(q.shape[-1]) if scale is None else scale,
        sliding_window_size=sliding_window_size,
        sinks=_sinks(sinks, q.dtype),
        lse_extend=lse_extend,
        page_size=page_size,
    )
    batch_size, heads_q, seq, _ = batch.q_shape
    lse = lse_extend.reshape(batch_size, seq, heads_q).transpose(1, 2)  # [total_q, heads_q] -> [batch, heads_q, seq]
    return batch.restore(o_extend), lse


attend_extend_p1 = functools.partial(attend_extend, page_size=1)
attend_extend_p16 = functools.partial(attend_extend, page_size=16)


# ------------------------------------------------------------------------------------------------ decode


def num_kv_splits(seq_lens: torch.Tensor, heads_q: int, heads_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_kv_splits [bs] int32, uneven_batch [1] int32) as TritonAttnBackend.get_num_kv_splits makes them
    (its default, non-deterministic mode): max_kv_splits everywhere on a device with no core count, else
    SGLang's Triton heuristic with the device's SM count."""
    get_num_kv_splits_triton, get_device_core_count = _kernels()[2:]
    device = seq_lens.device
    splits = torch.empty(seq_lens.shape, dtype=torch.int32, device=device)
    uneven_batch = torch.zeros(1, dtype=torch.int32, device=device)
    core_count = get_device_core_count(device.index or 0) if device.type == "cuda" else 0
    if core_count <= 0:
        splits.fill_(MAX_KV_SPLITS)
        return splits, uneven_batch
    num_seq = seq_lens.numel()
    schedule = 256 if num_seq < 256 else 1 << (num_seq - 1).bit_length()
    get_num_kv_splits_triton[(1,)](splits, seq_lens, num_seq, 1, heads_q, heads_kv, MAX_KV_SPLITS, core_count,
                                   MAX_NUM_SEQ=schedule, uneven_batch_ptr=uneven_batch)
    return splits, uneven_batch


def splits_used(length: int, splits: int) -> int:
    """How many of `splits` KV splits the decode kernels fill for a sequence of `length` keys."""
    per_split = math.ceil(math.ceil(length / splits) / MIN_BLOCK_KV) * MIN_BLOCK_KV
    return math.ceil(length / per_split)


@torch.no_grad()
def attend_decode(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, page_size=1,
                  window_keys=None):
    """decode_attention_fwd on cases where every sequence has exactly one query (causal or not: the one query is
    the sequence's last token either way).

    window_keys: how many of its last keys a sequence reads under a window. Default: SGLang's decode rail,
    sliding_window_size = window - 1 keys (one short of the window: see the module docstring); `window` keys is
    what SGLang's FlashInfer decode reads and its extend kernel sees.
    """
    where = f"sglang decode (page size {page_size})"
    _check(q, k, v, sinks, window, cu_seqlens, where, causal, scale)
    batch = token_batch(q, k, v, cu_seqlens)
    if any(q_len != 1 for q_len in batch.q_lens):
        raise NotImplementedError("SGLang's decode kernel takes exactly one query per sequence; cases with more "
                                  "run through its extend kernel (sglang_p1_extend, sglang_p16_extend)")
    if window is not None and window_keys is None:
        window_keys = _sliding_window_size(window)
    decode_attention_fwd = _kernels()[1]
    k_buffer, v_buffer, req_to_token = _token_pool(batch, page_size)
    seq_lens = batch.k_lens
    kv_indptr, kv_indices = _kv_rails(req_to_token, seq_lens, -1 if window is None else window_keys, q.device)
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], v.shape[3]
    # forward_decode passes the splits sized on the full sequence lengths, window layers included.
    splits, uneven_batch = num_kv_splits(torch.tensor(seq_lens, dtype=torch.int64, device=q.device), heads_q, heads_kv)
    o = torch.full_like(batch.q, float("nan"))  # batch.q: [n_seqs, heads_q, head_dim], one query per sequence
    attn_logits = torch.full((len(seq_lens), heads_q, MAX_KV_SPLITS, head_dim), float("nan"), dtype=torch.float32,
                             device=q.device)
    attn_lse = torch.full((len(seq_lens), heads_q, MAX_KV_SPLITS), float("nan"), dtype=torch.float32,
                          device=q.device)
    decode_attention_fwd(
        batch.q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse, splits, MAX_KV_SPLITS,
        default_scale(q.shape[-1]) if scale is None else scale,
        1.0, 1.0,  # k_scale, v_scale
        sinks=_sinks(sinks, q.dtype),
        page_size=page_size,
        uneven_batch=uneven_batch,
    )
    return batch.restore(o), None


attend_decode_p1 = functools.partial(attend_decode, page_size=1)
attend_decode_p16 = functools.partial(attend_decode, page_size=16)
