"""The sink-attention matrix: one backend on one case and dtype, every quantity, judged by the tolerance rule.

Each case runs three things, named as FlashAttention's tests name them: the `candidate` (the backend),
the `exact` float64 reference (on the very values the candidate received, rounded to its dtype), and
the `naive` reference in the candidate's dtype. A quantity passes when
error(candidate) <= k * error(naive) + floor  (rlparity.metrics).

What a backend declares it does not compute is skipped with the reason, never passed:
- its forward raises NotImplementedError (a case it does not support): every quantity of that case;
- forward-only (an inference kernel): its backward raises NotImplementedError (a torch.autograd.Function
  without backward raises autograd's "You must implement either the backward or vjp method"), or neither
  out nor lse requires grad (computed under torch.no_grad, or detached). The backward quantities (dq, dk,
  dv, dsink_via_do, dsink_via_dlse; dsink_nonzero in the sensitivity check) are skipped as "forward-only";
  out and lse are judged as for any backend;
- lse-less: the backend returns (out, None). lse and dsink_via_dlse are skipped as "lse-less".
A gradient that is missing while out (or lse) requires grad is a gradient of zero, and fails: the graph
was cut before q, k, v or the sinks, and training through it would silently not learn them. A backward
that raises anything else is an error of the backward quantities only.
"""

from dataclasses import dataclass, field, replace

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
OUT_GRADIENTS = ("dq", "dk", "dv", "dsink_via_do")  # through out, with respect to q, k, v, sinks
BACKWARD_QUANTITIES = OUT_GRADIENTS + ("dsink_via_dlse",)
LSE_QUANTITIES = ("lse", "dsink_via_dlse")  # what a backend without lse cannot be checked on
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
    """What one implementation produced on one case: forward outputs and gradients by quantity."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    unjudged: dict[str, Measurement] = field(default_factory=dict)  # not produced: a skip or an error, with why
    cut: set[str] = field(default_factory=set)  # gradients the implementation did not return (zeros in values)

    def set_aside(self, quantities, verdict: str, reason: str) -> None:
        for quantity in quantities:  # the first reason stands: an lse-less kernel's dsink_via_dlse stays lse-less
            self.unjudged.setdefault(quantity, Measurement(quantity, verdict, reason=reason))


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _leaves(inputs: Inputs, requires_grad: bool):
    return tuple(t.detach().requires_grad_(requires_grad) for t in inputs.tensors())


def _take_gradients(run: _Run, out, lse, leaves, inputs: Inputs, name: str, where: str) -> None:
    """Gradients through out (dq, dk, dv, dsink_via_do) and through lse (dsink_via_dlse), each path on its own."""
    sinks = leaves[3]
    paths = (("out", out, leaves, inputs.dout, OUT_GRADIENTS), ("lse", lse, (sinks,), inputs.dlse, ("dsink_via_dlse",)))
    for label, output, wrt, cotangent, quantities in paths:
        if output is None:
            continue  # lse-less: set aside already
        if not output.requires_grad:
            grads = (None,) * len(wrt)
        else:
            try:
                grads = torch.autograd.grad(output, wrt, cotangent.to(output.dtype), retain_graph=True,
                                            allow_unused=True)
            except NotImplementedError as exc:
                run.set_aside(quantities, SKIP, f"{name}: forward-only: its backward raised NotImplementedError: "
                                                f"{_first_line(exc)}")
                continue
            except Exception as exc:  # the backend's own failure, reported in one line
                run.set_aside(quantities, ERROR,
                              f"{where}: backward through {label} raised {type(exc).__name__}: {_first_line(exc)}")
                continue
        for quantity, grad, leaf in zip(quantities, grads, wrt):
            if grad is None:
                run.cut.add(quantity)
                grad = torch.zeros_like(leaf)
            run.values[quantity] = grad.detach()


@dataclass
class _Trial:
    """One backend on one case and dtype: what `measure` and `sink_sensitivity` share."""

    backend: Backend
    case: Case
    dtype: torch.dtype
    device: torch.device
    skip_reason: str | None = None  # why the backend does not run here at all
    backward_reason: str = AVAILABLE  # or why its backward is not run (its backward probe)
    inputs: Inputs | None = None
    kwargs: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.backend.name} [{self.case.name}, {DTYPE_NAMES[self.dtype]}]"

    def candidate(self, inputs: Inputs, with_backward: bool = True) -> _Run:
        """The backend's outputs and gradients; raises what the backend raised in its forward."""
        name = self.backend.name
        leaves = _leaves(inputs, with_backward and self.backward_reason == AVAILABLE)
        result = self.backend.attend(*leaves, **self.kwargs)
        out, lse = check_outputs(result, leaves[0], where=self.where, lse_optional=True)
        run = _Run({"out": out.detach()})
        if lse is None:
            run.set_aside(LSE_QUANTITIES, SKIP, f"{name}: lse-less: it returns (out, None), so lse and the sink "
                                                "gradient through lse are not checked")
        else:
            run.values["lse"] = lse.detach()
        if not with_backward:
            return run
        if self.backward_reason != AVAILABLE:
            run.set_aside(BACKWARD_QUANTITIES, SKIP, self.backward_reason)
        elif not out.requires_grad and (lse is None or not lse.requires_grad):
            run.set_aside(BACKWARD_QUANTITIES, SKIP, f"{name}: forward-only: its out does not require grad (computed "
                                                     "under torch.no_grad or detached), so no gradient flows back "
                                                     "through it")
        else:
            _take_gradients(run, out, lse, leaves, inputs, name, self.where)
        return run

    def exact(self, inputs: Inputs, with_backward: bool = True) -> _Run:
        """The reference in float64, on the very values the candidate received (already rounded to its dtype)."""
        float64 = Inputs(*(t.double() for t in inputs.tensors()), inputs.dout.double(), inputs.dlse.double(),
                         inputs.cu_seqlens)
        return self.naive(float64, with_backward)

    def naive(self, inputs: Inputs, with_backward: bool = True) -> _Run:
        """The reference in the inputs' own dtype."""
        leaves = _leaves(inputs, with_backward)
        out, lse = sink_attention(*leaves, **self.kwargs)
        run = _Run({"out": out.detach(), "lse": lse.detach()})
        if with_backward:
            _take_gradients(run, out, lse, leaves, inputs, "reference", "reference")
        return run


def _trial(backend: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> _Trial:
    trial = _Trial(backend, case, dtype, device)
    reason = backend.availability(device)
    if reason != AVAILABLE:
        trial.skip_reason = reason
    elif dtype not in backend.dtypes:
        supported = ", ".join(DTYPE_NAMES[supported] for supported in backend.dtypes)
        trial.skip_reason = f"{backend.name} does not support {DTYPE_NAMES[dtype]} (it supports {supported})"
    else:
        trial.backward_reason = backend.backward_probe(device)
        trial.inputs = make_inputs(case, dtype, device)
        trial.kwargs = attend_kwargs(case, trial.inputs)
    return trial


def _failed(exc: Exception, trial: _Trial, quantities) -> list[Measurement]:
    """A forward that raised: NotImplementedError is a declared gap (skip), anything else an error."""
    if isinstance(exc, NotImplementedError):
        return [Measurement(q, SKIP, reason=f"{trial.backend.name}: not supported: {exc}") for q in quantities]
    if isinstance(exc, RlparityError):
        message = str(exc)
    else:
        message = f"{trial.where}: raised {type(exc).__name__}: {_first_line(exc)}"
    return [Measurement(q, ERROR, reason=message) for q in quantities]


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


def _judge(quantity: str, trial: _Trial, candidate: _Run, exact: _Run, naive: _Run) -> Measurement:
    k = K_FORWARD if quantity in FORWARD_QUANTITIES else K_BACKWARD
    error = max_abs_error(candidate.values[quantity], exact.values[quantity])
    naive_error = max_abs_error(naive.values[quantity], exact.values[quantity])
    floor = rounding_floor(exact.values[quantity], _output_dtype(quantity, trial.dtype))
    if quantity.startswith("dsink"):
        floor = max(floor, sink_gradient_floor(quantity, exact, trial.inputs, trial.dtype))
    tol = tolerance(naive_error, floor, k)
    if error <= tol:
        return Measurement(quantity, PASS, error, tol, naive_error)
    why = f"error {error:.3g} > tolerance {tol:.3g} ({k:g} x naive {naive_error:.3g} + floor {floor:.3g})"
    if quantity in candidate.cut:
        why += "; the backend returned no gradient for it (the graph is cut)"
    return Measurement(quantity, FAIL, error, tol, naive_error, why)


def measure(backend: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> list[Measurement]:
    """Every quantity of the matrix for one backend, case and dtype. Never raises for a backend's fault."""
    trial = _trial(backend, case, dtype, device)
    if trial.skip_reason is not None:
        return [Measurement(quantity, SKIP, reason=trial.skip_reason) for quantity in QUANTITIES]
    try:
        candidate = trial.candidate(trial.inputs)
    except Exception as exc:  # the backend's own failure is a result, reported in one line
        return _failed(exc, trial, QUANTITIES)
    exact, naive = trial.exact(trial.inputs), trial.naive(trial.inputs)
    return [candidate.unjudged.get(quantity) or _judge(quantity, trial, candidate, exact, naive)
            for quantity in QUANTITIES]


def sink_sensitivity(backend: Backend, case: Case, dtype: torch.dtype, device: torch.device) -> list[Measurement]:
    """Does moving the sinks move `out`, and is the sink gradient non-zero? Catches a backend that ignores sinks."""
    trial = _trial(backend, case, dtype, device)
    if trial.skip_reason is not None:
        return [Measurement(quantity, SKIP, reason=trial.skip_reason) for quantity in SENSITIVITY_QUANTITIES]
    shifted = replace(trial.inputs, sinks=trial.inputs.sinks + SINK_PERTURBATION)
    try:
        candidate = trial.candidate(trial.inputs)
        moved = trial.candidate(shifted, with_backward=False)
    except Exception as exc:
        return _failed(exc, trial, SENSITIVITY_QUANTITIES)
    exact, exact_moved = trial.exact(trial.inputs), trial.exact(shifted, with_backward=False)
    naive = trial.naive(trial.inputs)

    # The candidate's output must move by at least half of what the exact output moves, with the
    # matrix's own out-tolerance as the noise allowance.
    exact_shift = max_abs_error(exact_moved.values["out"], exact.values["out"])
    shift = max_abs_error(moved.values["out"], candidate.values["out"])
    noise = tolerance(max_abs_error(naive.values["out"], exact.values["out"]),
                      rounding_floor(exact.values["out"], dtype), K_FORWARD)
    needed = 0.5 * exact_shift - noise
    results = [Measurement(
        "sinks_change_out", PASS if shift >= needed else FAIL, shift, needed,
        reason="" if shift >= needed else f"out moved by {shift:.3g} when every sink moved by "
        f"{SINK_PERTURBATION}; the exact output moves by {exact_shift:.3g}: the backend ignores the sinks",
    )]
    if (unjudged := candidate.unjudged.get("dsink_via_do")) is not None:
        results.append(Measurement("dsink_nonzero", unjudged.verdict, reason=unjudged.reason))
        return results
    dsink = candidate.values["dsink_via_do"].double().abs().max().item()
    exact_dsink = exact.values["dsink_via_do"]
    floor = max(rounding_floor(exact_dsink, dtype), sink_gradient_floor("dsink_via_do", exact, trial.inputs, dtype))
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
