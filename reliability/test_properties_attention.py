"""Generated input to the attention contract: every input gets a correct answer or a one-line RlparityError naming
the argument, from every CPU backend (reference, eager, chunked, flex forward, triton interpreted).

Correct: out and lse finite and within the matrix's rule of the float64 reference on the very values the backend
received, error <= K_FORWARD x error(naive same-dtype reference) + rounding floor (rlparity.metrics).
A NotImplementedError is the contract's declared "not supported" (a skip in the matrix): eager takes no window
without causal masking and no (cu_seqlens_q, cu_seqlens_k) pair, triton no pair.
Sinks: -inf is "no sink" (a valid input: plain attention); +inf and NaN are refused naming `sinks`
(rlparity.attention.contract.check_inputs).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as tests/test_triton_sink.py

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rlparity.attention import get_backend  # noqa: E402
from rlparity.attention.cases import CASES_BY_NAME  # noqa: E402
from rlparity.attention.contract import check_outputs  # noqa: E402
from rlparity.attention.matrix import measure  # noqa: E402
from rlparity.attention.registry import AVAILABLE  # noqa: E402
from rlparity.errors import RlparityError  # noqa: E402
from rlparity.metrics import K_FORWARD, max_abs_error, rounding_floor, tolerance  # noqa: E402
from rlparity.reference import sink_attention  # noqa: E402
from rlparity.results import ERROR, FAIL, PASS, SKIP  # noqa: E402

CPU = torch.device("cpu")
BACKENDS = [name for name in ("reference", "eager", "chunked", "flex", "triton")
            if get_backend(name).availability(CPU) == AVAILABLE]
FAST_BACKENDS = [name for name in BACKENDS if name != "triton"]
# The tolerance rule scales with the naive implementation's error, a sample estimate: over one or two values it can
# be near zero by luck (seen: one bf16 lse whose naive error was 14x below chunked's ordinary rounding; with 8 heads,
# chunked's bf16 lse at 1.5x). Every input has this many query heads, so each query row gives HEADS_Q samples, as
# the matrix's larger cases do.
HEADS_Q = 16
# Triton runs interpreted on CPU, ~20x slower than the torch backends: its property draws fewer inputs.
TRITON_EXAMPLES = 60
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Per-test limits (pytest-timeout). Measured here (2 cores), idle / under a load average of 7: the valid-input
# property 28 s / 60 s, triton's 8 s / 15 s, each of the others under 2 s / 5 s; the limits are 4x the loaded time,
# with one minute at least for the quick ones (the first call imports transformers' masks and Triton).
VALID_TIMEOUT_S = 240
TRITON_TIMEOUT_S = 60
REFUSAL_TIMEOUT_S = 60
OUTPUTS_TIMEOUT_S = 60
USER_KERNEL_TIMEOUT_S = 60
# The sinks the strategies draw: ordinary logits, one that vanishes next to every score, and "no sink" (-inf).
# Not exactly 0: with scores far below it the exact lse is log(1 + e^-57) = 0 in float64, the rounding floor at 0 is
# 0, and a backend that computes log1p (flex: logaddexp) answers 1.7e-25 and "fails" (a gap of the tolerance rule
# at an exact zero, reported, not a backend error). Sinks far above the scores (+30 over one key) leave out ~ 1e-13,
# where fp32's exp conditioning (|lse| u relative) exceeds the floor the rule derives (triton: 1.48e-19 > 1.37e-19).
SINK_VALUES = st.one_of(st.floats(-6, 6).filter(lambda x: x != 0.0), st.sampled_from([-float("inf"), -30.0]))
SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


def one_line_error(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, f"{type(exc).__name__} is not one line: {message!r}"
    return message


@st.composite
def packing(draw, max_sequences=4, max_len=4):
    """(seq_q, seq_k, cu_seqlens) for packed input: one offsets tensor, or a (q, k) pair with q_len <= k_len."""
    k_lens = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_sequences).filter(lambda x: sum(x)))
    if draw(st.booleans()):
        cu = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
        return sum(k_lens), sum(k_lens), cu
    q_lens = [draw(st.integers(0, n)) for n in k_lens]
    if not sum(q_lens):
        q_lens[k_lens.index(max(k_lens))] = 1
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    return sum(q_lens), sum(k_lens), (cu_q, cu_k)


@st.composite
def valid_inputs(draw):
    """((q, k, v, sinks), options): tiny shapes, every contract option, tensors possibly non-contiguous."""
    dtype = draw(st.sampled_from(DTYPES))
    # HEADS_Q query heads, so that even one query gives the naive error HEADS_Q samples (see HEADS_Q)
    heads_kv, head_dim = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4, 8]))
    groups = HEADS_Q // heads_kv
    causal = draw(st.booleans())
    cu_seqlens = None
    if draw(st.booleans()):
        batch = 1
        seq_q, seq_k, cu_seqlens = draw(packing())
    else:
        batch, seq_k = draw(st.integers(1, 2)), draw(st.integers(1, 6))
        seq_q = draw(st.integers(1, 6))  # causal with seq_q > seq_k: the first queries see only the sink
    window = draw(st.one_of(st.none(), st.integers(1, 10)))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.0, -0.7, 2.5]), st.floats(-3, 3)))
    magnitude = draw(st.sampled_from([1.0, 8.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    heads_q = heads_kv * groups

    def tensor(heads, seq):
        values = torch.randn(batch, seq, heads, head_dim, generator=generator, dtype=torch.float64) * magnitude
        if draw(st.booleans()):
            return values.to(dtype).transpose(1, 2)  # [B, H, S, D] as a strided view: not contiguous
        return values.transpose(1, 2).contiguous().to(dtype)

    q, k, v = tensor(heads_q, seq_q), tensor(heads_kv, seq_k), tensor(heads_kv, seq_k)
    sinks = torch.tensor(draw(st.lists(SINK_VALUES, min_size=heads_q, max_size=heads_q)), dtype=torch.float64)
    if causal and cu_seqlens is None and seq_q > seq_k:  # keyless queries need a finite sink (-inf is refused)
        sinks = sinks.nan_to_num(neginf=-30.0)
    sinks = sinks.to(dtype)
    options = {"causal": causal, "window": window, "scale": scale, "cu_seqlens": cu_seqlens}
    return (q, k, v, sinks), options


def judge(name, dtype, result, tensors, options):
    """Assert the backend's (out, lse) is finite and within the matrix's tolerance of the float64 reference."""
    out, lse = check_outputs(result, tensors[0], where=name)  # finite, right shapes and dtypes
    exact = sink_attention(*(t.double() for t in tensors), **options)
    naive = sink_attention(*tensors, **options)
    for quantity, got, expected, approximate, out_dtype in (
            ("out", out, exact[0], naive[0], dtype),
            ("lse", lse, exact[1], naive[1], torch.float64 if dtype == torch.float64 else torch.float32)):
        naive_error = max_abs_error(approximate, expected)
        tol = tolerance(naive_error, rounding_floor(expected, out_dtype), K_FORWARD)
        error = max_abs_error(got, expected)
        assert error <= tol, f"{name} {quantity}: error {error:.3g} > tolerance {tol:.3g} {options}"


@pytest.mark.timeout(VALID_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(valid_inputs())
def test_valid_input_gets_the_reference_answer(case):
    answer_or_declared_gap(FAST_BACKENDS, *case)


@pytest.mark.timeout(TRITON_TIMEOUT_S)
@settings(max_examples=TRITON_EXAMPLES, suppress_health_check=SLOW_IS_FINE)
@given(valid_inputs())
def test_valid_input_gets_the_reference_answer_from_triton(case):
    answer_or_declared_gap([name for name in BACKENDS if name == "triton"], *case)


def answer_or_declared_gap(backends, tensors, options):
    dtype = tensors[0].dtype
    for name in backends:
        backend = get_backend(name)
        try:
            result = backend.attend(*tensors, **options)
        except NotImplementedError as exc:  # the contract's declared gap
            one_line_error(exc)
            continue
        except RlparityError as exc:
            # a valid input may be refused only for a dtype the backend does not declare (triton: no float64)
            assert dtype not in backend.dtypes and str(dtype).removeprefix("torch.") in one_line_error(exc), exc
            continue
        if dtype in backend.dtypes:
            judge(name, dtype, result, tensors, options)


@pytest.mark.timeout(OUTPUTS_TIMEOUT_S)
def test_minus_infinity_sinks_are_plain_attention():
    """sinks = -inf: the contract's "no sink"; the answer is softmax attention, here torch's own in float64."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    sinks = torch.full((2,), -float("inf"), dtype=torch.float64)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name in BACKENDS:
        if torch.float64 in get_backend(name).dtypes:
            out, _ = get_backend(name).attend(q, k, v, sinks)
            assert max_abs_error(out, plain) <= tolerance(0.0, rounding_floor(plain, torch.float64), K_FORWARD), name


# --- bad input: each mutation of a valid input, and the argument its refusal must name -------------------------


def _replace(tensors, index, value):
    return tuple(value if i == index else t for i, t in enumerate(tensors))


MUTATIONS = {
    # name: (argument the message names, mutate(tensors, options) -> (tensors, options))
    "q int": ("q", lambda t, o: (_replace(t, 0, t[0].to(torch.int32)), o)),
    "q bool": ("q", lambda t, o: (_replace(t, 0, t[0] > 0), o)),
    "q complex": ("q", lambda t, o: (_replace(t, 0, t[0].to(torch.complex64)), o)),
    "q a list": ("q", lambda t, o: (_replace(t, 0, t[0].tolist()), o)),
    "k dtype": ("k and v", lambda t, o: (_replace(t, 1, t[1].double() if t[1].dtype != torch.float64 else
                                                  t[1].float()), o)),
    "q rank 3": ("rank 4", lambda t, o: (_replace(t, 0, t[0][0]), o)),
    "k head_dim": ("k and v", lambda t, o: ((t[0], t[1][..., :0], t[2][..., :0], t[3]), o)),
    "k seq 0": ("q and k", lambda t, o: ((t[0], t[1][:, :, :0], t[2][:, :, :0], t[3]), o)),
    "heads_kv": ("heads_kv", lambda t, o: ((t[0], *(x.repeat(1, 3, 1, 1) for x in t[1:3]), t[3]), o)),
    "sinks NaN": ("sinks", lambda t, o: (_replace(t, 3, t[3].clone().fill_(float("nan"))), o)),
    "sinks +inf": ("sinks", lambda t, o: (_replace(t, 3, t[3].clone().fill_(float("inf"))), o)),
    "sinks int": ("sinks", lambda t, o: (_replace(t, 3, t[3].to(torch.int64)), o)),
    "sinks shape": ("sinks", lambda t, o: (_replace(t, 3, t[3][:1].repeat(t[0].shape[1] + 1)), o)),
    "sinks on meta": ("sinks on meta", lambda t, o: (_replace(t, 3, t[3].to("meta")), o)),
    "window 0": ("window", lambda t, o: (t, o | {"window": 0})),
    "window -3": ("window", lambda t, o: (t, o | {"window": -3})),
    "window 2.5": ("window", lambda t, o: (t, o | {"window": 2.5})),
    "window True": ("window", lambda t, o: (t, o | {"window": True})),
    "scale nan": ("scale", lambda t, o: (t, o | {"scale": float("nan")})),
    "scale inf": ("scale", lambda t, o: (t, o | {"scale": float("inf")})),
    "scale -inf": ("scale", lambda t, o: (t, o | {"scale": -float("inf")})),
    "scale 1e308": ("scale", lambda t, o: ((*(x.clone().fill_(2.0) for x in t[:3]), t[3]), o | {"scale": 1e308})),
    "scale 10**400": ("scale", lambda t, o: (t, o | {"scale": 10**400})),
    "scale text": ("scale", lambda t, o: (t, o | {"scale": "0.5"})),
    "cu_seqlens int64": ("cu_seqlens", lambda t, o: (t, o | {"cu_seqlens": torch.tensor([0, t[0].shape[2]])})),
    "cu_seqlens short": ("cu_seqlens", lambda t, o: (t, o | {"cu_seqlens": torch.tensor(
        [0, t[0].shape[2] - 1], dtype=torch.int32)})),
    "cu_seqlens decreasing": ("cu_seqlens", lambda t, o: (t, o | {"cu_seqlens": torch.tensor(
        [0, t[0].shape[2] + 1, t[0].shape[2]], dtype=torch.int32)})),
    "cu_seqlens triple": ("cu_seqlens", lambda t, o: (t, o | {
        "cu_seqlens": [torch.tensor([0], dtype=torch.int32)] * 3})),
    "cu_seqlens_q longer": ("cu_seqlens_q", lambda t, o: (t, o | {"cu_seqlens": (
        torch.tensor([0, t[0].shape[2]], dtype=torch.int32), torch.tensor([0, 1, t[1].shape[2]], dtype=torch.int32))})),
    "-inf sinks, keyless queries": ("sinks", lambda t, o: ((torch.cat([t[0]] * 2, dim=2), *t[1:3],
                                                            t[3].clone().fill_(-float("inf"))),
                                                           o | {"causal": True, "cu_seqlens": None})),
}


@st.composite
def bad_inputs(draw):
    tensors, options = draw(valid_inputs())
    mutation = draw(st.sampled_from(sorted(MUTATIONS)))
    named, mutate = MUTATIONS[mutation]
    if mutation.startswith("cu_seqlens") and tensors[0].shape[0] != 1:
        tensors = tuple(t[:1] for t in tensors[:3]) + (tensors[3],)
    if mutation.startswith("cu_seqlens"):
        # one sequence of all the keys, queries as many as the keys, so that only the mutation is wrong
        tensors = (tensors[1].repeat_interleave(tensors[0].shape[1] // tensors[1].shape[1], dim=1), *tensors[1:])
    if mutation == "-inf sinks, keyless queries" and tensors[0].shape[2] < tensors[1].shape[2]:
        tensors = (tensors[1].repeat_interleave(tensors[0].shape[1] // tensors[1].shape[1], dim=1), *tensors[1:])
    tensors, options = mutate(tensors, options)
    return mutation, named, tensors, options


@pytest.mark.timeout(REFUSAL_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(bad_inputs())
def test_bad_input_is_refused_naming_the_argument(case):
    mutation, named, tensors, options = case
    for name in BACKENDS:
        with pytest.raises(RlparityError) as refused:
            get_backend(name).attend(*tensors, **options)
        assert named in one_line_error(refused.value), f"{name} on {mutation}: {refused.value}"


# --- what a backend returns: check_outputs, and a user's kernel behind `rlparity check attention --backend` --------

RESULT_FAULTS = {
    # fault: (what the message names, result from the good (out, lse))
    "not a pair": ("expected (out, lse)", lambda out, lse: out),
    "three items": ("expected (out, lse)", lambda out, lse: (out, lse, lse)),
    "out a list": ("tensors", lambda out, lse: (out.tolist(), lse)),
    "out shape": ("out has shape", lambda out, lse: (torch.cat([out, out], dim=-1), lse)),
    "out dtype": ("out has dtype", lambda out, lse: (out.to(torch.float16 if out.dtype != torch.float16 else
                                                             torch.float32), lse)),
    "out NaN": ("out holds", lambda out, lse: (out.clone().fill_(float("nan")), lse)),
    "lse shape": ("lse has shape", lambda out, lse: (out, lse[..., None])),
    "lse dtype": ("lse has dtype", lambda out, lse: (out, lse.to(torch.bfloat16))),
    "lse inf": ("lse holds", lambda out, lse: (out, lse.clone().fill_(float("inf")))),
    "lse None": ("lse", lambda out, lse: (out, None)),
}


@pytest.mark.timeout(OUTPUTS_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(valid_inputs(), st.sampled_from(sorted(RESULT_FAULTS)))
def test_malformed_results_are_refused_naming_what_is_wrong(case, fault):
    tensors, options = case
    good = get_backend("reference").attend(*tensors, **options)
    assert check_outputs(good, tensors[0], where="k") is not None
    named, corrupt = RESULT_FAULTS[fault]
    with pytest.raises(RlparityError) as refused:
        check_outputs(corrupt(*good), tensors[0], where="k")
    assert named in one_line_error(refused.value), f"{fault}: {refused.value}"


def faulty_kernel(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """A user's kernel (`--backend reliability.test_properties_attention:faulty_kernel`): the reference, with the
    fault FAULT[0] applied to what it returns."""
    fault = FAULT[0]
    if fault == "raises deep inside":
        return torch.matmul(q, v[..., :1, :])  # a shape error from inside torch
    if fault == "declares unsupported":
        raise NotImplementedError("declared unsupported")
    out, lse = get_backend("reference").attend(q, k, v, sinks, causal=causal, window=window, scale=scale,
                                              cu_seqlens=cu_seqlens)
    if fault == "none":
        return out, lse
    if fault == "lse-less":
        return out, None
    return RESULT_FAULTS[fault][1](out, lse)


FAULT = ["none"]  # the fault faulty_kernel applies: set by the test before each run
USER_FAULTS = sorted(set(RESULT_FAULTS) - {"lse None"}) + ["none", "lse-less", "raises deep inside",
                                                         "declares unsupported"]
USER_CASES = ("tiny", "gqa8", "window_edge", "varlen", "sink_extremes", "decode_batch")


@pytest.mark.timeout(USER_KERNEL_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(st.sampled_from(USER_FAULTS),
       st.sampled_from(USER_CASES), st.sampled_from(DTYPES[:3]))
def test_a_faulty_user_kernel_is_an_error_record_not_a_crash(fault, case, dtype):
    """The matrix behind `rlparity check attention --backend module:function` turns whatever a user's kernel does
    into records: pass for the correct one, skip for a declared gap, a one-line error otherwise; it never raises."""
    FAULT[0] = fault
    backend = get_backend(f"{__name__}:faulty_kernel")
    measurements = measure(backend, CASES_BY_NAME[case], dtype, CPU)
    verdicts = {m.verdict for m in measurements}
    for m in measurements:
        assert "\n" not in m.reason, m.reason
    if fault == "none":
        assert verdicts == {PASS}, [m.reason for m in measurements]
    elif fault == "lse-less":
        assert PASS in verdicts and SKIP in verdicts and ERROR not in verdicts
    elif fault == "declares unsupported":
        assert verdicts == {SKIP}
    else:
        assert verdicts & {ERROR, FAIL} and PASS not in verdicts, [m.reason for m in measurements]
