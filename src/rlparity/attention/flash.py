"""FlashAttention builds that take sinks, behind the backend signature.

- `fa3`: `flash_attn_interface`, the Hopper (sm90) build of Dao-AILab/flash-attention. Upstream's
  `flash_attn_func` has no sink argument (Dao-AILab/flash-attention#1797); builds that add one name it
  `s_aux`, `learnable_sink` or `sinks`. The probe looks for it by name and refuses a build without it
  rather than let it compute plain attention — the silent failure this project exists to catch.
- `vllm_fa3`: vLLM's build (`vllm.vllm_flash_attn.flash_attn_varlen_func`, `fa_version=3`, sinks as
  `s_aux`, float32 as vLLM's attention backend asserts). Packed input only, so batches are packed
  here; forward only (vLLM compiles the backward kernels out of its build).
- `fa4`: `flash_attn.cute.flash_attn_func` (CuTe DSL, sm90 and sm100), sinks as `learnable_sink`, which
  its interface asserts is bfloat16. Its backward returns no sink gradient and marks lse
  non-differentiable (Dao-AILab/flash-attention#2102) in the versions read for this adapter.

Conventions read from their sources: q, k, v are [batch, seq, heads, head_dim] (packed: [total, heads,
head_dim] with cu_seqlens_q/k and max_seqlen_q/k); lse is [batch, heads, seq] (packed: [heads, total]);
causal masks and windows are aligned bottom-right as in the contract; `window_size=(left, right)` lets
query i see keys i - left .. i + right, so GPT-OSS's window w (i - w < j <= i) is (w - 1, 0), and
(-1, -1) (FA4: (None, None)) means no window.

Backward probes run a tiny forward and backward once per device and report what is missing (an
exception, or no gradient reaching the sinks), so a newer build that adds sink gradients is picked up.
None of this runs without a GPU and the package: it is written from the sources and is unverified until
the GPU conformance session runs it.
"""

import functools
import inspect

import torch

from rlparity.attention.contract import check_inputs, refuse_query_key_pair
from rlparity.attention.registry import AVAILABLE
from rlparity.errors import RlparityError
from rlparity.reference.attention import default_scale

FLASH_DTYPES = (torch.bfloat16, torch.float16)  # FA3 and FA4 run 16-bit inputs only
SINK_PARAMETER_NAMES = ("s_aux", "learnable_sink", "sinks")
# vLLM's FlashAttention backend asserts float32 sinks; FA4's interface asserts bfloat16 learnable_sink.
VLLM_SINK_DTYPE = torch.float32
FA4_SINK_DTYPE = torch.bfloat16
FA3_CAPABILITY_MAJOR = (9,)  # the hopper build and vLLM's FA3 kernels run on sm90 only
FA4_CAPABILITY_MAJOR = (9, 10)  # flash_attn.cute: sm90 and sm100
# Shapes of the one-off gradient check in the backward probes: large enough for one full tile.
_CHECK_SEQ, _CHECK_HEADS_Q, _CHECK_HEADS_KV, _CHECK_HEAD_DIM = 128, 2, 1, 64


# ------------------------------------------------------------------------------------------------ shared


def window_size(window: int | None, causal: bool, none=-1) -> tuple:
    """GPT-OSS window w (i - w < j <= i) -> FlashAttention's (left, right) in keys before/after query i."""
    left = none if window is None else window - 1
    right = 0 if causal else none
    return (left, right)


def _cuda_reason(device: torch.device, majors: tuple[int, ...], what: str) -> str | None:
    if device.type != "cuda":
        return f"{what} runs on CUDA only, got device {device.type!r}; run `nox -s gpu_conformance` on a GPU machine"
    if not torch.cuda.is_available():
        return f"{what} needs CUDA, which torch {torch.__version__} does not see"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in majors:
        wanted = " or ".join(f"sm{m}x" for m in majors)
        return f"{what} needs a {wanted} GPU, got sm{major}{minor} ({torch.cuda.get_device_name(device)})"
    return None


def _sink_parameter(fn) -> str | None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in SINK_PARAMETER_NAMES if name in params), None)


def _check(q, k, v, sinks, window, cu_seqlens, where, causal=True, scale=None):
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where=where)
    refuse_query_key_pair(cu_seqlens, where, "the builds take cu_seqlens_q and cu_seqlens_k, but the adapter passes "
                          "one offset tensor for both; not wired until it can be run on a GPU")
    _check_build_limits(q, where)


def _check_build_limits(q, where):
    """What the FlashAttention builds accept (tests of the adapters' layout code replace this on CPU)."""
    if q.dtype not in FLASH_DTYPES:
        raise RlparityError(f"{where}: expected q of dtype bfloat16 or float16, got {q.dtype}")
    if q.device.type != "cuda":
        raise RlparityError(f"{where}: expected CUDA tensors, got {q.device}")


def _to_bshd(x):
    return x.transpose(1, 2)  # [B, H, S, D] -> [B, S, H, D]; the builds copy only if stride(-1) != 1


def _packed(x):
    return x[0].transpose(0, 1)  # [1, H, total, D] -> [total, H, D]


def _max_seqlen(cu_seqlens) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _lse_dtype_float32(lse, where):
    if lse is None:
        raise RlparityError(f"{where}: the build returned no lse; this version cannot serve the contract")
    return lse.float()


@functools.cache
def _gradient_check(backend: str, device_index: int) -> str:
    """Run `backend` forward and backward once on a tiny GQA case; AVAILABLE or what went missing."""
    attend = {"fa3": attend_fa3, "vllm_fa3": attend_vllm_fa3, "fa4": attend_fa4}[backend]
    device = torch.device("cuda", device_index)
    generator = torch.Generator(device=device).manual_seed(0)
    shape_q = (1, _CHECK_HEADS_Q, _CHECK_SEQ, _CHECK_HEAD_DIM)
    shape_kv = (1, _CHECK_HEADS_KV, _CHECK_SEQ, _CHECK_HEAD_DIM)
    q = torch.randn(shape_q, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
    k = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
    v = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
    sinks = torch.randn(_CHECK_HEADS_Q, device=device, dtype=torch.float32, generator=generator).requires_grad_()
    try:
        out, lse = attend(q, k, v, sinks, causal=True)
        loss = out.float().sum() + (lse.sum() if lse.requires_grad else 0.0)
        loss.backward()
    except Exception as exc:  # the reason is the point of the probe
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return f"{backend} backward raised {type(exc).__name__}: {first_line}"
    missing = [name for name, t in (("dq", q), ("dk", k), ("dv", v), ("dsink", sinks)) if t.grad is None]
    if missing:
        return f"{backend} returns no gradient for {', '.join(missing)}: its backward cannot train the sinks"
    if not lse.requires_grad:
        return f"{backend} returns a non-differentiable lse: gradients through lse (dSink via dLSE) are dropped"
    return AVAILABLE


def _backward_probe(backend: str, forward_probe, device: torch.device) -> str:
    reason = forward_probe(device)
    if reason != AVAILABLE:
        return reason
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gradient_check(backend, index)


# --------------------------------------------------------------------------------------------------- FA3


def _fa3_module():
    import flash_attn_interface

    return flash_attn_interface


def probe_fa3(device: torch.device) -> str:
    device = torch.device(device)
    try:
        module = _fa3_module()
    except Exception as exc:
        return (f"flash_attn_interface not importable ({type(exc).__name__}: {exc}); build it from "
                "Dao-AILab/flash-attention hopper/ (`cd hopper && python setup.py install`) on an sm90 machine")
    if (reason := _cuda_reason(device, FA3_CAPABILITY_MAJOR, "flash_attn_interface (FA3)")) is not None:
        return reason
    if _sink_parameter(module.flash_attn_func) is None:
        return ("this flash_attn_interface build has no sink argument (none of "
                f"{', '.join(SINK_PARAMETER_NAMES)}); it would compute attention without sinks "
                "(Dao-AILab/flash-attention#1797)")
    return AVAILABLE


def backward_probe_fa3(device: torch.device) -> str:
    return _backward_probe("fa3", probe_fa3, torch.device(device))


def attend_fa3(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    where = "fa3 (flash_attn_interface)"
    _check(q, k, v, sinks, window, cu_seqlens, where, causal, scale)
    module = _fa3_module()
    scale = default_scale(q.shape[-1]) if scale is None else scale
    options = dict(softmax_scale=scale, causal=causal, window_size=window_size(window, causal),
                   return_attn_probs=True)
    if cu_seqlens is None:
        fn = module.flash_attn_func
        sink_name = _sink_parameter(fn)
        if sink_name is None:
            raise RlparityError(f"{where}: flash_attn_func takes no sinks ({probe_fa3(q.device)})")
        result = fn(_to_bshd(q), _to_bshd(k), _to_bshd(v), **options, **{sink_name: sinks.float()})
        out, lse = result[0], result[1]
        return out.transpose(1, 2), _lse_dtype_float32(lse, where)  # [B, S, H, D] -> [B, H, S, D]
    fn = module.flash_attn_varlen_func
    sink_name = _sink_parameter(fn)
    if sink_name is None:
        raise RlparityError(f"{where}: flash_attn_varlen_func takes no sinks ({probe_fa3(q.device)})")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = _max_seqlen(cu)
    result = fn(_packed(q), _packed(k), _packed(v), cu, cu, longest, longest, **options,
                **{sink_name: sinks.float()})
    out, lse = result[0], result[1]
    return out.transpose(0, 1)[None], _lse_dtype_float32(lse, where)[None]  # [total, H, D] -> [1, H, total, D]


# ----------------------------------------------------------------------------------------------- vLLM FA3


def _vllm_module():
    from vllm import vllm_flash_attn

    return vllm_flash_attn


def probe_vllm_fa3(device: torch.device) -> str:
    device = torch.device(device)
    try:
        module = _vllm_module()
    except Exception as exc:
        return (f"vllm.vllm_flash_attn not importable ({type(exc).__name__}: {exc}); "
                "`pip install rlparity[vllm]` on a CUDA machine")
    if (reason := _cuda_reason(device, FA3_CAPABILITY_MAJOR, "vLLM's FA3 build")) is not None:
        return reason
    if "s_aux" not in inspect.signature(module.flash_attn_varlen_func).parameters:
        return "this vLLM's flash_attn_varlen_func has no s_aux argument: its FA3 kernels predate sink support"
    is_supported = getattr(module, "is_fa_version_supported", None)
    if is_supported is not None and not is_supported(3):
        why = getattr(module, "fa_version_unsupported_reason", lambda version: "unknown")(3)
        return f"vLLM's flash-attn build cannot run FA3 here: {why}"
    return AVAILABLE


def backward_probe_vllm_fa3(device: torch.device) -> str:
    return _backward_probe("vllm_fa3", probe_vllm_fa3, torch.device(device))


def attend_vllm_fa3(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    where = "vllm_fa3 (vllm.vllm_flash_attn)"
    _check(q, k, v, sinks, window, cu_seqlens, where, causal, scale)
    module = _vllm_module()
    batch, heads_q, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = default_scale(head_dim) if scale is None else scale
    if cu_seqlens is None:
        # vLLM exposes only the packed entry point: a batch is `batch` sequences of equal length.
        cu_q = torch.arange(0, (batch + 1) * seq_q, seq_q, device=q.device, dtype=torch.int32)
        cu_k = torch.arange(0, (batch + 1) * seq_k, seq_k, device=q.device, dtype=torch.int32)
        max_q, max_k = seq_q, seq_k
        q_p, k_p, v_p = (_to_bshd(t).reshape(-1, t.shape[1], head_dim) for t in (q, k, v))  # [B*S, H, D]
    else:
        cu_q = cu_k = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_q = max_k = _max_seqlen(cu_q)
        q_p, k_p, v_p = _packed(q), _packed(k), _packed(v)
    out, lse = module.flash_attn_varlen_func(
        q_p, k_p, v_p, max_q, cu_q, max_k, cu_seqlens_k=cu_k, softmax_scale=scale, causal=causal,
        window_size=list(window_size(window, causal)), return_softmax_lse=True, fa_version=3,
        s_aux=sinks.to(VLLM_SINK_DTYPE),
    )
    lse = _lse_dtype_float32(lse, where)  # [Hq, total]
    if cu_seqlens is None:
        out = out.reshape(batch, seq_q, heads_q, head_dim).transpose(1, 2)
        lse = lse.reshape(heads_q, batch, seq_q).transpose(0, 1)
        return out, lse
    return out.transpose(0, 1)[None], lse[None]


# --------------------------------------------------------------------------------------------------- FA4


def _fa4_module():
    from flash_attn import cute

    return cute


def probe_fa4(device: torch.device) -> str:
    device = torch.device(device)
    try:
        module = _fa4_module()
    except Exception as exc:
        return (f"flash_attn.cute (FA4) not importable ({type(exc).__name__}: {exc}); install flash-attention's "
                "flash_attn/cute package (`pip install flash-attn-cute` or from source) with nvidia-cutlass-dsl")
    if (reason := _cuda_reason(device, FA4_CAPABILITY_MAJOR, "flash_attn.cute (FA4)")) is not None:
        return reason
    if "learnable_sink" not in inspect.signature(module.flash_attn_func).parameters:
        return "this flash_attn.cute has no learnable_sink argument: it cannot apply sinks"
    return AVAILABLE


def backward_probe_fa4(device: torch.device) -> str:
    return _backward_probe("fa4", probe_fa4, torch.device(device))


def attend_fa4(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    where = "fa4 (flash_attn.cute)"
    _check(q, k, v, sinks, window, cu_seqlens, where, causal, scale)
    module = _fa4_module()
    scale = default_scale(q.shape[-1]) if scale is None else scale
    options = dict(softmax_scale=scale, causal=causal, window_size=window_size(window, causal, none=None),
                   learnable_sink=sinks.to(FA4_SINK_DTYPE))
    if cu_seqlens is None:
        fn = module.flash_attn_func
        if "return_lse" in inspect.signature(fn).parameters:
            options["return_lse"] = True  # older versions return lse only when q, k or v requires grad
        out, lse = fn(_to_bshd(q), _to_bshd(k), _to_bshd(v), **options)
        return out.transpose(1, 2), _lse_dtype_float32(lse, where)
    fn = module.flash_attn_varlen_func
    if "return_lse" in inspect.signature(fn).parameters:
        options["return_lse"] = True
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = _max_seqlen(cu)
    out, lse = fn(_packed(q), _packed(k), _packed(v), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                  max_seqlen_k=longest, **options)
    return out.transpose(0, 1)[None], _lse_dtype_float32(lse, where)[None]
