"""The sink-attention matrix: one backend on one case and dtype, every quantity, judged by the tolerance rule.

For each case three things are computed: the candidate, the float64 reference (on the very values
the candidate received, rounded to its dtype), and the naive implementation in the candidate's
dtype. A quantity passes when  error(candidate) <= k * error(naive) + floor  (rlparity.metrics).
"""

from dataclasses import dataclass

import torch

from rlparity.attention.cases import DTYPE_NAMES, Case, Inputs, attend_kwargs, make_inputs
from rlparity.attention.contract import check_outputs
from rlparity.attention.registry import AVAILABLE, Backend
from rlparity.errors import RlparityError
from rlparity.metrics import (
    FLOOR_ROUNDINGS,
    K_BACKWARD,
    K_FORWARD,
    max_abs_error,
    rounding_floor,
    tolerance,
    unit_roundoff,
)
from rlparity.reference import sink_attention
from rlparity.results import ERROR, FAIL, PASS, SKIP, Record

FORWARD_QUANTITIES = ("out", "lse")
BACKWARD_QUANTITIES = ("dq", "dk", "dv", "dsink_via_do", "dsink_via_dlse")
QUANTITIES = FORWARD_QUANTITIES + BACKWARD_QUANTITIES
SENSITIVITY_QUANTITIES = ("sinks_change_out", "dsink_nonzero")
# The sensitivity check adds this to every sink logit; the reference output then moves by O(0.1),
# far above any dtype's noise, so a backend whose output does not move is ignoring the sinks.
SINK_PERTURBATION = 1.0
SENSITIVITY_CASE = "gqa8"


@dataclass
class Measurement:
    quantity: str
    verdict: str
    error: float | None = None
    tolerance: float | None = None
    naive_error: float | None = None
    reason: str = ""


@dataclass
class _Run:
    """Everything one implementation produced on one case: forward outputs and gradients."""

    values: dict[str, torch.Tensor]


def _run(fn, inputs: Inputs, kwargs: dict, where: str | None, with_backward: bool) -> _Run:
    """Run `fn` and take its gradients; `where` names a candidate whose outputs must meet the contract."""
    q, k, v, sinks = (t.detach().requires_grad_(with_backward) for t in inputs.tensors())
    result = fn(q, k, v, sinks, **kwargs)
    out, lse = result if where is None else check_outputs(result, q, where=where)
    values = {"out": out.detach(), "lse": lse.detach()}
    if with_backward:
        grads = torch.autograd.grad(out, (q, k, v, sinks), inputs.dout.to(out.dtype), retain_graph=True,
                                    allow_unused=True)
        (dsink_lse,) = torch.autograd.grad(lse, (sinks,), inputs.dlse.to(lse.dtype), allow_unused=True)
        named = dict(zip(("dq", "dk", "dv", "dsink_via_do"), grads)) | {"dsink_via_dlse": dsink_lse}
        for name, grad in named.items():
            # A missing gradient is a gradient of zero: the backend cut the graph, which the matrix then fails.
            ref = {"dq": q, "dk": k, "dv": v}.get(name, sinks)
            values[name] = torch.zeros_like(ref) if grad is None else grad.detach()
    return _Run(values)


def _failed(exc: Exception, where: str, quantities) -> list[Measurement]:
    """A backend that raised: NotImplementedError is a declared gap (skip), anything else an error."""
    if isinstance(exc, NotImplementedError):
        return [Measurement(q, SKIP, reason=f"{where}: not supported: {exc}") for q in quantities]
    if isinstance(exc, RlparityError):
        message = str(exc)
    else:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        message = f"{where}: raised {type(exc).__name__}: {first_line}"
    return [Measurement(q, ERROR, reason=message) for q in quantities]


def _to_float64(inputs: Inputs) -> Inputs:
    return Inputs(*(t.double() for t in inputs.tensors()), inputs.dout.double(), inputs.dlse.double(),
                  inputs.cu_seqlens)


def _output_dtype(quantity: str, dtype: torch.dtype) -> torch.dtype:
    if quantity == "lse":
        return torch.float64 if dtype == torch.float64 else torch.float32
    return dtype


def sink_gradient_floor(quantity: str, exact: _Run, inputs: Inputs, dtype: torch.dtype) -> float:
    """The rounding floor of dsink, a sum over every query of c_i = P_sink,i (dLSE_i - D_i).

    A few sums of many terms make the naive error a small-sample estimate, so the floor counts the
    rounding of each term: P_sink,i = exp(sigma - lse_i) comes from an lse rounded with relative
    error u, i.e. an absolute error of u |lse_i| in the exponent; the rest of c_i adds one rounding.
    Summed over queries without cancellation: u * sum_i |c_i| (1 + |lse_i|), per head.
    """
    lse = exact.values["lse"]
    sinks = inputs.sinks.double().reshape(1, -1, 1)
    p_sink = torch.exp(sinks - lse)
    if quantity == "dsink_via_do":
        terms = p_sink * (inputs.dout.double() * exact.values["out"]).sum(dim=-1)
    else:
        terms = p_sink * inputs.dlse.double()
    per_head = (terms.abs() * (1 + lse.abs())).sum(dim=(0, 2))
    return FLOOR_ROUNDINGS * unit_roundoff(dtype) * per_head.max().item()


def measure(backend: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> list[Measurement]:
    """Every quantity of the matrix for one backend, case and dtype. Never raises for a backend's fault."""
    where = f"{backend.name} [{case.name}, {DTYPE_NAMES[dtype]}]"
    reason = backend.availability(device)
    if reason != AVAILABLE:
        return [Measurement(quantity, SKIP, reason=reason) for quantity in QUANTITIES]
    if dtype not in backend.dtypes:
        return [Measurement(q, SKIP, reason=f"{backend.name} does not support {dtype}") for q in QUANTITIES]
    backward_reason = backend.backward_probe(device)
    with_backward = backward_reason == AVAILABLE
    inputs = make_inputs(case, dtype, device)
    kwargs = attend_kwargs(case, inputs)
    try:
        candidate = _run(backend.attend, inputs, kwargs, where, with_backward)
    except Exception as exc:  # the backend's own failure is a result, reported in one line
        return _failed(exc, where, QUANTITIES)
    exact = _run(sink_attention, _to_float64(inputs), kwargs, None, True)
    naive = _run(sink_attention, inputs, kwargs, None, True)

    measurements = []
    for quantity in QUANTITIES:
        if quantity not in candidate.values:
            measurements.append(Measurement(quantity, SKIP, reason=backward_reason))
            continue
        k = K_FORWARD if quantity in FORWARD_QUANTITIES else K_BACKWARD
        error = max_abs_error(candidate.values[quantity], exact.values[quantity])
        naive_error = max_abs_error(naive.values[quantity], exact.values[quantity])
        floor = rounding_floor(exact.values[quantity], _output_dtype(quantity, dtype))
        if quantity.startswith("dsink"):
            floor = max(floor, sink_gradient_floor(quantity, exact, inputs, dtype))
        tol = tolerance(naive_error, floor, k)
        verdict = PASS if error <= tol else FAIL
        why = "" if verdict == PASS else (
            f"error {error:.3g} > tolerance {tol:.3g} ({k:g} x naive {naive_error:.3g} + floor {floor:.3g})")
        measurements.append(Measurement(quantity, verdict, error, tol, naive_error, why))
    return measurements


def sink_sensitivity(backend: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> list[Measurement]:
    """Does moving the sinks move `out`, and is the sink gradient non-zero? Catches a backend that ignores sinks."""
    where = f"{backend.name} [{case.name}, {DTYPE_NAMES[dtype]}]"
    reason = backend.availability(device)
    if reason != AVAILABLE:
        return [Measurement(q, SKIP, reason=reason) for q in SENSITIVITY_QUANTITIES]
    inputs = make_inputs(case, dtype, device)
    shifted = Inputs(inputs.q, inputs.k, inputs.v, inputs.sinks + SINK_PERTURBATION, inputs.dout, inputs.dlse,
                     inputs.cu_seqlens)
    kwargs = attend_kwargs(case, inputs)
    with_backward = backend.backward_probe(device) == AVAILABLE
    try:
        base = _run(backend.attend, inputs, kwargs, where, with_backward)
        moved = _run(backend.attend, shifted, kwargs, where, False)
    except Exception as exc:
        return _failed(exc, where, SENSITIVITY_QUANTITIES)
    exact_base = _run(sink_attention, _to_float64(inputs), kwargs, None, True)
    exact_moved = _run(sink_attention, _to_float64(shifted), kwargs, None, False)
    naive = _run(sink_attention, inputs, kwargs, None, True)

    # The candidate's output must move by at least half of what the exact output moves, with the
    # matrix's own out-tolerance as the noise allowance.
    exact_shift = max_abs_error(exact_moved.values["out"], exact_base.values["out"])
    shift = max_abs_error(moved.values["out"], base.values["out"])
    noise = tolerance(max_abs_error(naive.values["out"], exact_base.values["out"]),
                      rounding_floor(exact_base.values["out"], dtype), K_FORWARD)
    needed = 0.5 * exact_shift - noise
    results = [Measurement(
        "sinks_change_out", PASS if shift >= needed else FAIL, shift, needed,
        reason="" if shift >= needed else f"out moved by {shift:.3g} when every sink moved by "
        f"{SINK_PERTURBATION}; the exact output moves by {exact_shift:.3g}: the backend ignores the sinks",
    )]
    if not with_backward:
        results.append(Measurement("dsink_nonzero", SKIP, reason=backend.backward_probe(device)))
        return results
    dsink = base.values["dsink_via_do"].double().abs().max().item()
    exact_dsink = exact_base.values["dsink_via_do"]
    floor = max(rounding_floor(exact_dsink, dtype), sink_gradient_floor("dsink_via_do", exact_base, inputs, dtype))
    floor = tolerance(max_abs_error(naive.values["dsink_via_do"], exact_dsink), floor, K_BACKWARD)
    needed = 0.5 * exact_dsink.abs().max().item() - floor
    results.append(Measurement(
        "dsink_nonzero", PASS if dsink >= needed else FAIL, dsink, needed,
        reason="" if dsink >= needed else f"max |dsink| is {dsink:.3g}, the exact one {exact_dsink.abs().max():.3g}: "
        "the backward drops the sink gradient",
    ))
    return results


def to_records(backend: Backend, case: Case, dtype: torch.dtype, measurements: list[Measurement],
               prefix: str = "sink_attention") -> list[Record]:
    return [
        Record(property=f"{prefix}.{m.quantity}", subject=backend.name, case=case.name, dtype=DTYPE_NAMES[dtype],
               verdict=m.verdict, error=m.error, tolerance=m.tolerance, reason=m.reason, shapes=case.shapes(),
               extra={} if m.naive_error is None else {"naive_error": m.naive_error})
        for m in measurements
    ]
