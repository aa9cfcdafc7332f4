"""Checks at the boundary of the attention contract: what a backend receives and what it returns.

A backend returns (out, lse). One that computes no lse (some inference kernels) says so by returning
(out, None): the attention matrix then checks it without lse (lse and dsink_via_dlse are skipped as
"lse-less"), while callers that need the lse (ring attention merges blocks by it) get an error.
"""

import contextlib
import contextvars
import math
import numbers

import torch

from rlparity.errors import RlparityError

# Inside trusted_values(), check_inputs leaves out the checks that read values (see trusted_values).
_CHECK_VALUES = contextvars.ContextVar("rlparity_attention_check_values", default=True)

# The dtypes the contract computes in; anything else (integer, bool, complex, float8) is refused at the boundary.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None,
                 where="attention") -> None:
    """Refuses, in one line naming the argument, an input the contract gives no finite answer for.

    Sinks: a logit of -inf is "no sink" (exp(-inf) = 0 leaves Z_i the sum over the keys: plain attention);
    +inf would put all the weight on the sink (out 0, lse +inf: not a finite lse) and NaN means nothing,
    so both are refused, and so is -inf where a query sees no key (causal with seq_q > seq_k: its Z would be 0).
    The scores scale * q.k must fit in the dtype kernels accumulate them in (float32, float64 for float64 inputs),
    bounded by |scale| * max|q| * max|k| * head_dim: a bound, so it refuses only scales far from any model's (fp16
    and bf16 values give scores at most 65504^2 * head_dim * scale, and bf16's reach float32's range only near it).
    """
    for label, tensor in (("q", q), ("k", k), ("v", v), ("sinks", sinks)):
        if not isinstance(tensor, torch.Tensor):
            raise RlparityError(f"{where}: expected {label} to be a torch.Tensor, got {type(tensor).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise RlparityError(
            f"{where}: expected q, k, v of rank 4 [batch, heads, seq, head_dim], "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in FLOAT_DTYPES:
        raise RlparityError(f"{where}: expected q of dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RlparityError(f"{where}: expected k and v in q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    devices = {str(t.device) for t in (q, k, v, sinks)}
    if len(devices) != 1:
        raise RlparityError(f"{where}: expected q, k, v and sinks on one device, got q on {q.device}, k on "
                            f"{k.device}, v on {v.device}, sinks on {sinks.device}")
    batch, heads_q, seq_q, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise RlparityError(
            f"{where}: expected k and v of shape [{batch}, heads_kv, seq_k, {head_dim}], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.numel() == 0 or k.numel() == 0:
        raise RlparityError(f"{where}: expected q and k without an empty dimension, got {tuple(q.shape)} and "
                            f"{tuple(k.shape)}")
    heads_kv, seq_k = k.shape[1], k.shape[2]
    if heads_q % heads_kv:
        raise RlparityError(f"{where}: heads_kv={heads_kv} must divide heads_q={heads_q}")
    if tuple(sinks.shape) != (heads_q,):
        raise RlparityError(f"{where}: expected sinks of shape ({heads_q},), one per query head, "
                            f"got {tuple(sinks.shape)}")
    if sinks.dtype not in FLOAT_DTYPES:
        raise RlparityError(f"{where}: sinks must be floating point, got {sinks.dtype}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise RlparityError(f"{where}: window counts tokens and must be an int >= 1 or None, got {window!r}")
    if cu_seqlens is not None:
        if batch != 1:
            raise RlparityError(f"{where}: packed input (cu_seqlens) needs batch == 1, got batch {batch}")
        check_cu_seqlens(cu_seqlens, seq_q, seq_k, where=where)
    scale = _scale_value(scale, head_dim, where)
    if _CHECK_VALUES.get():
        # causal with seq_q > seq_k: the first seq_q - seq_k queries see no key, only the sink (out 0, lse = sink)
        keyless_rows = cu_seqlens is None and causal and seq_q > seq_k
        _check_values(q, k, sinks, scale, where, keyless_rows)


@contextlib.contextmanager
def trusted_values():
    """Inside, check_inputs checks types, shapes, dtypes, devices and options but not the values of sinks, q and k.

    Those checks read the tensors' values back to the host: one synchronisation per call, which on a GPU keeps the
    host from queueing the next kernel. A timing loop whose inputs were checked once before it runs inside this."""
    token = _CHECK_VALUES.set(False)
    try:
        yield
    finally:
        _CHECK_VALUES.reset(token)


def _scale_value(scale, head_dim: int, where: str) -> float:
    if scale is None:
        return head_dim**-0.5
    try:
        value = float(scale) if isinstance(scale, numbers.Real) and not isinstance(scale, bool) else math.nan
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if not math.isfinite(value):
        raise RlparityError(f"{where}: scale must be a finite number or None, got {scale!r}")
    return value


def _largest_magnitude(tensor: torch.Tensor) -> torch.Tensor:
    """max |x| by a reduction (no copy of the tensor): NaN or inf if the tensor holds one."""
    low, high = torch.aminmax(tensor.detach())
    return torch.maximum(-low, high).to(torch.float64)


def _check_values(q, k, sinks, scale: float, where: str, keyless_rows: bool) -> None:
    """The checks that read values, gathered into one transfer to the host (one sync on a GPU).

    The values of q, k and v are not refused: non-finite keys that no query sees leave the answer finite (tests
    poison the blocks a window excludes this way), and visible ones give non-finite outputs, which check_outputs
    refuses wherever outputs are checked. The bound on the scores is checked for finite q and k."""
    with torch.no_grad():
        bad_sink = torch.isnan(sinks) | (sinks == math.inf) | ((sinks == -math.inf) & keyless_rows)
        summary = torch.stack([bad_sink.any().to(torch.float64), _largest_magnitude(q), _largest_magnitude(k)]).tolist()
    if summary[0]:
        keyless = f"; finite where queries see no key (causal, seq_q={q.shape[2]} > seq_k={k.shape[2]})" * keyless_rows
        raise RlparityError(f"{where}: sinks must be finite or -inf (no sink){keyless}, got {sinks.tolist()}")
    bound = abs(scale) * summary[1] * summary[2] * q.shape[-1]
    accumulated = torch.float64 if q.dtype == torch.float64 else torch.float32
    largest = torch.finfo(accumulated).max
    if math.isfinite(summary[1]) and math.isfinite(summary[2]) and bound > largest:
        raise RlparityError(f"{where}: scale {scale:g} times q.k may reach {bound:.3g}, beyond {accumulated}'s largest "
                            f"value {largest:.3g}: use a smaller scale or smaller q and k")


def split_cu_seqlens(cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_q, cu_seqlens_k): a pair as given, or one tensor for both (queries and keys share positions)."""
    if isinstance(cu_seqlens, (tuple, list)):
        return cu_seqlens[0], cu_seqlens[1]
    return cu_seqlens, cu_seqlens


def is_query_key_pair(cu_seqlens) -> bool:
    """Whether cu_seqlens gives queries and keys their own offsets (decode, extend on a cached prefix)."""
    return isinstance(cu_seqlens, (tuple, list))


def refuse_query_key_pair(cu_seqlens, backend: str, why: str) -> None:
    """NotImplementedError (a skip in the matrix) for a backend that takes no per-sequence query offsets."""
    if is_query_key_pair(cu_seqlens):
        raise NotImplementedError(f"{backend} takes no (cu_seqlens_q, cu_seqlens_k) pair (decode and extend "
                                  f"batches): {why}")


def check_cu_seqlens(cu_seqlens, total_q: int, total_k: int, *, where: str) -> None:
    if isinstance(cu_seqlens, (tuple, list)) and len(cu_seqlens) != 2:
        raise RlparityError(f"{where}: cu_seqlens must be one tensor or a pair (cu_seqlens_q, cu_seqlens_k), "
                            f"got {len(cu_seqlens)} items")
    pair = is_query_key_pair(cu_seqlens)
    for label, offsets, total in zip(("cu_seqlens_q", "cu_seqlens_k") if pair else ("cu_seqlens", "cu_seqlens"),
                                     split_cu_seqlens(cu_seqlens), (total_q, total_k)):
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32 or offsets.dim() != 1:
            got = f"{offsets.dtype} of shape {tuple(offsets.shape)}" if isinstance(offsets, torch.Tensor) else \
                type(offsets).__name__
            raise RlparityError(f"{where}: {label} must be a 1-D int32 tensor, got {got}")
        if offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != total:
            raise RlparityError(f"{where}: {label} must run from 0 to the token count {total}, "
                                f"got {offsets.tolist()}")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise RlparityError(f"{where}: {label} must not decrease, got {offsets.tolist()}")
    cu_q, cu_k = split_cu_seqlens(cu_seqlens)
    if pair:
        if cu_q.numel() != cu_k.numel():
            raise RlparityError(f"{where}: cu_seqlens_q and cu_seqlens_k must describe the same sequences, got "
                                f"{cu_q.numel() - 1} and {cu_k.numel() - 1}")
        q_lens, k_lens = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        if bool((q_lens > k_lens).any()):
            raise RlparityError(f"{where}: cu_seqlens_q, cu_seqlens_k: a sequence has more queries than keys (queries "
                                f"are the last of its keys): query lengths {q_lens.tolist()}, key lengths "
                                f"{k_lens.tolist()}")


def check_outputs(result, q, *, where: str, lse_optional: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse) if the backend returned what the contract says, else an error naming what is wrong.

    lse_optional: the caller can do without the lse, so (out, None) is accepted and returned as is.
    """
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise RlparityError(f"{where}: expected (out, lse), got {type(result).__name__}")
    out, lse = result
    if lse is None and not lse_optional:
        raise RlparityError(f"{where}: returned (out, None), a kernel without lse, but this use needs the lse")
    if not isinstance(out, torch.Tensor) or not isinstance(lse, (torch.Tensor, type(None))):
        raise RlparityError(f"{where}: expected tensors (out, lse) or (out, None), "
                            f"got ({type(out).__name__}, {type(lse).__name__})")
    if tuple(out.shape) != tuple(q.shape):
        raise RlparityError(f"{where}: out has shape {tuple(out.shape)}, expected {tuple(q.shape)} like q")
    if out.dtype != q.dtype:
        raise RlparityError(f"{where}: out has dtype {out.dtype}, expected {q.dtype} like q")
    if lse is None:
        _check_finite(where, out=out)
        return out, None
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise RlparityError(f"{where}: lse has shape {tuple(lse.shape)}, expected {tuple(q.shape[:3])}")
    expected_lse = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse.dtype != expected_lse:
        raise RlparityError(f"{where}: lse has dtype {lse.dtype}, expected {expected_lse}")
    _check_finite(where, out=out, lse=lse)
    return out, lse


def _check_finite(where: str, **tensors: torch.Tensor) -> None:
    for label, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise RlparityError(f"{where}: {label} holds {bad} non-finite values (NaN or inf)")
