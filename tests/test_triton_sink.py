"""The Triton sink-attention kernel against the float64 reference, under Triton's interpreter on CPU.

Each case computes the candidate (triton), the float64 reference and the naive float32 implementation,
and checks every quantity with the project's rule: error <= k x naive error + floor (rlparity.metrics).
Also: blocks outside the window are skipped by the loop bounds (poisoned keys never reach the output),
dSink is deterministic, and the FlashAttention adapters' probes answer with a reason on this machine.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The kernels are interpreted only if this is set before they are defined (imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlparity.attention import flash, triton_sink  # noqa: E402
from rlparity.attention.registry import AVAILABLE  # noqa: E402
from rlparity.errors import RlparityError  # noqa: E402
from rlparity.metrics import K_BACKWARD, K_FORWARD, max_abs_error, rounding_floor, tolerance  # noqa: E402
from rlparity.reference import sink_attention, sink_attention_backward  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_REASON = triton_sink.probe(DEVICE)
needs_triton = pytest.mark.skipif(TRITON_REASON != AVAILABLE, reason=TRITON_REASON)

# name: (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, options); small, so that the interpreter
# runs each case in about a second, yet larger than one CPU tile (16 x 32) so loops take several blocks.
CASES = {
    "causal": (2, 2, 2, 40, 40, 32, dict()),
    "window_edge": (1, 2, 1, 41, 41, 16, dict(window=20)),  # rows 19, 20, 21 straddle the window's edge
    "gqa4_window": (1, 8, 2, 48, 48, 16, dict(window=7)),
    "varlen_len1": (1, 2, 1, 45, 45, 16, dict(window=9, seqlens=(11, 1, 33))),
    "seqk_gt_seqq": (1, 4, 2, 9, 50, 32, dict(window=13)),
    "seqq_gt_seqk": (1, 2, 1, 37, 20, 16, dict()),  # the first 17 queries see no key, only the sink
    "bidirectional_window": (1, 2, 2, 33, 33, 16, dict(causal=False, window=6, scale=0.3)),
    "head_dim_24": (1, 2, 1, 20, 20, 24, dict()),  # padded to a 32-wide tile
    "head_dim_128": (1, 2, 1, 36, 36, 128, dict(window=9)),
}
QUANTITIES = ("out", "lse", "dq", "dk", "dv", "dsink_via_do", "dsink_via_dlse")


def _inputs(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, options, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

    tensors = (normal(batch, heads_q, seq_q, head_dim), normal(batch, heads_kv, seq_k, head_dim),
               normal(batch, heads_kv, seq_k, head_dim), normal(heads_q) * 2)
    dout, dlse = normal(batch, heads_q, seq_q, head_dim), normal(batch, heads_q, seq_q)
    kwargs = {key: options[key] for key in ("causal", "window", "scale") if key in options}
    if "seqlens" in options:
        kwargs["cu_seqlens"] = torch.tensor([0, *torch.tensor(options["seqlens"]).cumsum(0).tolist()],
                                            dtype=torch.int32, device=DEVICE)
    return tensors, dout, dlse, kwargs


def _triton_values(tensors, dout, dlse, kwargs, config=None):
    """Every quantity, with the two sink gradients taken through dO and dLSE separately."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, lse = triton_sink.attend(*leaves, **kwargs, config=config)
    grads = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    (dsink_lse,) = torch.autograd.grad(lse, leaves[3], dlse)
    return dict(zip(QUANTITIES, (out, lse, *grads, dsink_lse)))


def _math_values(tensors, dout, dlse, kwargs):
    """The reference's closed form, run in the dtype of `tensors` (float64: exact; float32: naive)."""
    out, lse = sink_attention(*tensors, **kwargs)
    zeros_out, zeros_lse = torch.zeros_like(out), torch.zeros_like(lse)
    dq, dk, dv, dsink_do = sink_attention_backward(*tensors, out, lse, dout.to(out.dtype), zeros_lse, **kwargs)
    *_, dsink_lse = sink_attention_backward(*tensors, out, lse, zeros_out, dlse.to(lse.dtype), **kwargs)
    return dict(zip(QUANTITIES, (out, lse, dq, dk, dv, dsink_do, dsink_lse)))


_MEASURED = {}


def _measured(name):
    """(candidate, exact, naive) for a case, computed once for all its quantities."""
    if name not in _MEASURED:
        tensors, dout, dlse, kwargs = _inputs(*CASES[name])
        candidate = _triton_values(tensors, dout, dlse, kwargs)
        exact = _math_values([t.double() for t in tensors], dout.double(), dlse.double(), kwargs)
        naive = _math_values(list(tensors), dout, dlse, kwargs)
        _MEASURED[name] = (candidate, exact, naive)
    return _MEASURED[name]


@needs_triton
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_float32(case, quantity):
    candidate, exact, naive = _measured(case)
    k = K_FORWARD if quantity in ("out", "lse") else K_BACKWARD
    error = max_abs_error(candidate[quantity], exact[quantity])
    naive_error = max_abs_error(naive[quantity], exact[quantity])
    tol = tolerance(naive_error, rounding_floor(exact[quantity], torch.float32), k)
    assert error <= tol, f"{case} {quantity}: error {error:.3g} > {tol:.3g} ({k} x naive {naive_error:.3g} + floor)"


# Larger than the CUDA tiles (up to 128 rows), so that their loops run several blocks in every phase.
CUDA_TILE_CASES = {
    "causal_gqa": (1, 4, 2, 300, 300, 64, dict()),
    "varlen_window": (1, 4, 1, 300, 300, 64, dict(window=100, seqlens=(150, 1, 149))),
    "head_dim_128_window": (1, 2, 1, 260, 260, 128, dict(window=70)),
}


@needs_triton
@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the conformance matrix runs the CUDA tiles natively")
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
@pytest.mark.parametrize("tile_dtype", [torch.bfloat16, torch.float32], ids=["tiles_16bit", "tiles_fp32"])
@pytest.mark.parametrize("case", CUDA_TILE_CASES)
def test_cuda_tiles_compute_the_same_function(case, tile_dtype, capability):
    """The tile sizes a GPU runs, interpreted on float32 inputs: block loops, phases and masks at those sizes."""
    batch, heads_q, heads_kv, seq_q, seq_k, head_dim, options = CUDA_TILE_CASES[case]
    config = triton_sink.cuda_block_config(capability, head_dim, tile_dtype)
    tensors, dout, dlse, kwargs = _inputs(*CUDA_TILE_CASES[case], seed=7)
    candidate = _triton_values(tensors, dout, dlse, kwargs, config=config)
    exact = _math_values([t.double() for t in tensors], dout.double(), dlse.double(), kwargs)
    naive = _math_values(list(tensors), dout, dlse, kwargs)
    for quantity in QUANTITIES:
        k = K_FORWARD if quantity in ("out", "lse") else K_BACKWARD
        error = max_abs_error(candidate[quantity], exact[quantity])
        naive_error = max_abs_error(naive[quantity], exact[quantity])
        tol = tolerance(naive_error, rounding_floor(exact[quantity], torch.float32), k)
        assert error <= tol, f"{config}: {quantity} error {error:.3g} > {tol:.3g} ({k} x naive {naive_error:.3g})"


@needs_triton
def test_bfloat16_matches_reference():
    """One bfloat16 case: on CPU this checks the interpreter's bfloat16 emulation path in the kernels."""
    tensors, dout, dlse, kwargs = _inputs(*CASES["gqa4_window"], dtype=torch.bfloat16, seed=3)
    candidate = _triton_values(tensors, dout, dlse, kwargs)
    exact = _math_values([t.double() for t in tensors], dout.double(), dlse.double(), kwargs)
    naive_out, naive_lse = sink_attention(*tensors, **kwargs)
    for name, naive, dtype in (("out", naive_out, torch.bfloat16), ("lse", naive_lse, torch.float32)):
        error = max_abs_error(candidate[name], exact[name])
        tol = tolerance(max_abs_error(naive, exact[name]), rounding_floor(exact[name], dtype), K_FORWARD)
        assert error <= tol, f"bf16 {name}: error {error:.3g} > tolerance {tol:.3g}"
    assert candidate["out"].dtype == torch.bfloat16 and candidate["lse"].dtype == torch.float32
    assert candidate["dq"].dtype == torch.bfloat16 and candidate["dsink_via_do"].dtype == torch.bfloat16


@needs_triton
def test_blocks_outside_the_window_are_skipped_not_masked():
    """Keys older than every query's window hold NaN. A masked visit would still multiply them by zero
    (0 x NaN = NaN) inside tl.dot, so finite results show their blocks were never loaded."""
    cfg = triton_sink.block_config(DEVICE, 16)
    block = max(cfg.fwd_n, cfg.dkdv_n, cfg.dq_n)  # powers of two: a multiple of every key tile
    window, seq_q = 8, 8
    first_visible = 3 * block + 5  # the oldest key the first query sees, inside the 4th block
    seq_k = first_visible + window - 1 + seq_q
    tensors, dout, dlse, kwargs = _inputs(1, 2, 1, seq_q, seq_k, 16, dict(window=window), seed=1)
    q, k, v, sinks = tensors
    poisoned = (first_visible // block) * block  # whole blocks before the first visible one
    k, v = k.clone(), v.clone()
    k[:, :, :poisoned], v[:, :, :poisoned] = float("nan"), float("nan")
    values = _triton_values((q, k, v, sinks), dout, dlse, kwargs)
    for name, value in values.items():
        assert torch.isfinite(value).all(), f"{name} read a block the window excludes"
    assert (values["dk"][:, :, :poisoned] == 0).all() and (values["dv"][:, :, :poisoned] == 0).all()


@needs_triton
def test_backward_is_deterministic():
    """dK, dV (GQA group sums) and dSink (per-block partials summed in torch) use no atomics."""
    tensors, dout, dlse, kwargs = _inputs(*CASES["gqa4_window"], seed=2)
    first = _triton_values(tensors, dout, dlse, kwargs)
    second = _triton_values(tensors, dout, dlse, kwargs)
    for name in ("dq", "dk", "dv", "dsink_via_do", "dsink_via_dlse"):
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_strided_inputs_in_transformers_layout():
    """q, k, v as views of [B, S, H, D] tensors, the layout transformers hands to attention."""
    tensors, dout, dlse, kwargs = _inputs(*CASES["gqa4_window"], seed=4)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:3]]
    assert not views[0].is_contiguous()
    out_views, lse_views = triton_sink.attend(*views, tensors[3], **kwargs)
    out, lse = triton_sink.attend(*tensors, **kwargs)
    assert torch.equal(out_views, out) and torch.equal(lse_views, lse)


@needs_triton
def test_float64_is_refused_with_the_reason():
    tensors, *_ = _inputs(1, 2, 1, 8, 8, 16, dict())
    with pytest.raises(RlparityError, match="float64.*reference"):
        triton_sink.attend(*[t.double() for t in tensors])


@needs_triton
@pytest.mark.skipif(DEVICE.type == "cuda", reason="an interpreter check, for machines without CUDA")
def test_an_interpreter_that_cannot_run_the_loops_is_refused_with_the_fix(monkeypatch):
    # What triton 3.6's interpreter does under numpy 2.4: int() of a one-element array inside the loop.
    def broken_launch(*args):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(triton_sink._kernels(), "_interpreter_check", {(1,): broken_launch})
    triton_sink._interpreter_check.cache_clear()
    try:
        reason = triton_sink.probe(DEVICE)
        assert reason != AVAILABLE and "numpy<2.4" in reason and "0-dimensional" in reason
        tensors, *_ = _inputs(1, 2, 1, 8, 8, 16, dict())
        with pytest.raises(RlparityError, match="numpy<2.4"):
            triton_sink.attend(*tensors)
    finally:
        triton_sink._interpreter_check.cache_clear()


def test_triton_probe_answers_with_a_reason_on_unsupported_devices():
    reason = triton_sink.probe(torch.device("meta"))
    assert reason != AVAILABLE and "meta" in reason


PROBES = {
    "fa3": (flash.probe_fa3, flash.backward_probe_fa3),
    "vllm_fa3": (flash.probe_vllm_fa3, flash.backward_probe_vllm_fa3),
    "fa4": (flash.probe_fa4, flash.backward_probe_fa4),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers on a machine without CUDA")
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("backend", PROBES)
def test_flash_probes_give_a_reason_on_cpu(backend, direction):
    probe = PROBES[backend][direction == "backward"]
    reason = probe(torch.device("cpu"))
    assert isinstance(reason, str) and reason != AVAILABLE
    assert "not importable" in reason or "CUDA" in reason


@pytest.mark.parametrize(("window", "causal", "expected"), [
    (None, True, (-1, 0)), (128, True, (127, 0)), (1, True, (0, 0)), (5, False, (4, -1)), (None, False, (-1, -1)),
])
def test_flash_window_convention(window, causal, expected):
    """GPT-OSS's window w counts the current token: FlashAttention's left extent is w - 1."""
    assert flash.window_size(window, causal) == expected


COMPILE_TARGETS = {
    "sm90-bf16-hd64-window": ["--arch", "90", "--dtype", "bf16", "--head-dim", "64"],
    "sm80-fp16-hd128-varlen": ["--arch", "80", "--dtype", "fp16", "--head-dim", "128", "--varlen", "--no-window"],
}


@pytest.mark.slow
@pytest.mark.parametrize("target", COMPILE_TARGETS)
def test_kernels_compile_for_cuda_without_a_gpu(target):
    """The interpreter cannot tell whether the kernels compile for a GPU; Triton's compiler and ptxas can."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia", reason="this triton build has no NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.triton_compile_check", *COMPILE_TARGETS[target]],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{target}: compile failed:\n{result.stdout}\n{result.stderr[-3000:]}"


@needs_triton
def test_a_sink_of_minus_infinity_is_plain_attention():
    """sigma = -inf removes the sink from Z: the kernel must then agree with plain softmax attention."""
    tensors, dout, dlse, kwargs = _inputs(*CASES["gqa4_window"], seed=5)
    sinks = torch.full_like(tensors[3], float("-inf"))
    candidate = _triton_values((*tensors[:3], sinks), dout, dlse, kwargs)
    exact = _math_values([t.double() for t in (*tensors[:3], sinks)], dout.double(), dlse.double(), kwargs)
    naive = _math_values([*tensors[:3], sinks], dout, dlse, kwargs)
    for quantity in ("out", "lse", "dq", "dk", "dv"):
        k = K_FORWARD if quantity in ("out", "lse") else K_BACKWARD
        error = max_abs_error(candidate[quantity], exact[quantity])
        tol = tolerance(max_abs_error(naive[quantity], exact[quantity]),
                        rounding_floor(exact[quantity], torch.float32), k)
        assert error <= tol, f"{quantity}: error {error:.3g} > {tol:.3g}"
    assert (candidate["dsink_via_do"] == 0).all() and (candidate["dsink_via_dlse"] == 0).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="an interpreter check, for machines without CUDA")
def test_interprets_even_when_triton_was_imported_first():
    """Another module may import triton before TRITON_INTERPRET=1 is set (a test suite does): Triton's own
    library functions are then compiled-mode, so the kernels must not call them."""
    import subprocess
    import sys

    script = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from rlparity.attention import triton_sink\n"
        "assert triton_sink.probe(torch.device('cpu')) == 'available'\n"
        "q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 1, 20, 16)\n"
        "sinks = torch.zeros(2, requires_grad=True)\n"
        "out, lse = triton_sink.attend(q, k, k, sinks, window=5)\n"
        "(out.sum() + lse.sum()).backward()\n"
        "assert torch.isfinite(sinks.grad).all()\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
