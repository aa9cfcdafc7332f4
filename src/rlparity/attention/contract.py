"""Checks at the boundary of the attention contract: what a backend receives and what it returns.

A backend returns (out, lse). One that computes no lse (some inference kernels) says so by returning
(out, None): the attention matrix then checks it without lse (lse and dsink_via_dlse are skipped as
"lse-less"), while callers that need the lse (ring attention merges blocks by it) get an error.
"""

import torch

from rlparity.errors import RlparityError


def check_inputs(q, k, v, sinks, *, window=None, cu_seqlens=None, where="attention") -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise RlparityError(
            f"{where}: expected q, k, v of rank 4 [batch, heads, seq, head_dim], "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads_q, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise RlparityError(
            f"{where}: expected k and v of shape [{batch}, heads_kv, seq_k, {head_dim}], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    heads_kv = k.shape[1]
    if heads_q % heads_kv:
        raise RlparityError(f"{where}: heads_kv={heads_kv} must divide heads_q={heads_q}")
    if tuple(sinks.shape) != (heads_q,):
        raise RlparityError(f"{where}: expected sinks of shape ({heads_q},), one per query head, "
                            f"got {tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        raise RlparityError(f"{where}: sinks must be floating point, got {sinks.dtype}")
    if window is not None and window < 1:
        raise RlparityError(f"{where}: window counts tokens and must be >= 1, got {window}")
    if cu_seqlens is not None:
        if batch != 1:
            raise RlparityError(f"{where}: packed input (cu_seqlens) needs batch == 1, got batch {batch}")
        check_cu_seqlens(cu_seqlens, q.shape[2], k.shape[2], where=where)


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
            raise RlparityError(f"{where}: a sequence has more queries than keys (queries are the last of its keys): "
                                f"query lengths {q_lens.tolist()}, key lengths {k_lens.tolist()}")


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
