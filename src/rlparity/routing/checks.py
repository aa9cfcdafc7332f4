"""The routing checks, each measuring one property of a trainer model (transformers' GPT-OSS) and
returning one Record: the verdict, the number it turned on, and the per-layer table in `extra`.

    determinism        repeated passes over one batch
    batch_invariance   a sequence alone vs inside a padded batch of others
    dual_forward       verl's rollout log-prob pass (eval, no grad), then the training forward (train, grad)
    trainer_vs_engine  routes of two engines on the same sequences
    replay             an engine's routes forced in the training forward (rlparity.routing.replay)
    router_precision   the router alone in bf16 vs fp32 (rlparity.routing.precision)

A path that claims determinism (CPU; CUDA under torch.use_deterministic_algorithms) must repeat itself
bitwise. Everywhere else routes may differ, but only by rounding: a flip at a large gap, or one that the
logits both sides report cannot produce, fails (rlparity.routing.agreement).
"""

from collections.abc import Sequence

import torch

from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.results import ERROR, FAIL, PASS, Record
from rlparity.routing.agreement import RoutingComparison, compare_routing
from rlparity.routing.forward import run_pass
from rlparity.routing.precision import router_precision
from rlparity.routing.replay import RouterReplay, forced_mismatches, replayed_pass, router_gradient_norms

PROPERTY = "routing"
REPEATS = 3  # passes in the determinism check: a race shows up as a difference between any two


def claims_determinism(device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu":
        return True, "CPU kernels reduce in a fixed order for fixed shapes and threads"
    if torch.are_deterministic_algorithms_enabled():
        return True, "torch.use_deterministic_algorithms(True) is on"
    return False, f"{device.type} without torch.use_deterministic_algorithms(True) makes no bitwise promise"


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(model.parameters())
    return parameter.dtype, parameter.device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shapes(token_ids: Sequence[Sequence[int]]) -> dict:
    return {"sequences": len(token_ids), "lengths": [len(sequence) for sequence in token_ids]}


def _max_logprob_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max((x.detach().cpu().double() - y.detach().cpu().double()).abs().max().item() for x, y in zip(a, b))


def _bitwise(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(a, b))


def _bug_flips_reason(comparison: RoutingComparison) -> str:
    return (f"{comparison.large_gap_flips} (token, layer) flips at a gap too large for "
            f"{_dtype_name(comparison.dtype)} rounding (census.LARGE_GAP_ROUNDINGS) and "
            f"{comparison.inconsistent_flips} that the logits both sides report cannot produce; "
            f"first: {comparison.flagged_examples[:2]}")


def check_determinism(model: torch.nn.Module, subject: str, token_ids: Sequence[Sequence[int]], pad_id: int,
                      repeats: int = REPEATS) -> Record:
    dtype, device = _model_dtype_device(model)
    claims, why = claims_determinism(device)
    first = run_pass(model, token_ids, pad_id, train=False, grad=False)
    worst, bitwise, max_diff, flagged = None, True, 0.0, None
    for _ in range(repeats - 1):
        again = run_pass(model, token_ids, pad_id, train=False, grad=False)
        comparison = compare_routing(first.routing, again.routing, dtype=dtype, names=("pass 1", "pass n"))
        same_logits = all(_bitwise(x.router_logits, y.router_logits) for x, y in zip(first.routing, again.routing))
        bitwise &= comparison.identical and same_logits and _bitwise(first.logprobs, again.logprobs)
        max_diff = max(max_diff, _max_logprob_diff(first.logprobs, again.logprobs))
        if worst is None or comparison.flips > worst.flips:
            worst = comparison
        if comparison.bug_flips and flagged is None:
            flagged = comparison
    if flagged is not None:
        verdict, reason = FAIL, _bug_flips_reason(flagged)
    elif claims and not bitwise:
        verdict, reason = FAIL, (f"the path claims determinism ({why}) but {repeats} passes differ: "
                                 f"{worst.flips} route flips, max |dlogp| {max_diff:.3g}")
    else:
        verdict, reason = PASS, "" if bitwise else f"not bitwise ({why}); flips only at rounding-level gaps"
    return Record(f"{PROPERTY}.determinism", subject, f"{repeats}_passes", _dtype_name(dtype), verdict,
                  error=max_diff, tolerance=0.0 if claims else None, reason=reason, shapes=_shapes(token_ids),
                  extra={"claims_determinism": claims, "why": why, "bitwise": bitwise, "comparison": worst.as_dict()})


def check_batch_invariance(model: torch.nn.Module, subject: str, probe: Sequence[int],
                           others: Sequence[Sequence[int]], pad_id: int) -> Record:
    """probe alone vs at row 1 of [others[0], probe, others[1:]...]; some other must be longer than the probe,
    so the probe is padded inside the batch."""
    if not others or max(len(other) for other in others) <= len(probe):
        raise RlparityError(f"batch invariance: needs another sequence longer than the probe ({len(probe)} tokens) "
                            f"so that the probe is padded in the batch; got lengths {[len(o) for o in others]}")
    dtype, _ = _model_dtype_device(model)
    batch = [others[0], probe, *others[1:]]
    alone = run_pass(model, [probe], pad_id, train=False, grad=False)
    batched = run_pass(model, batch, pad_id, train=False, grad=False)
    comparison = compare_routing(alone.routing, batched.routing[1:2], dtype=dtype, names=("alone", "in batch"))
    logprob_diff = _max_logprob_diff(alone.logprobs, batched.logprobs[1:2])
    bitwise = comparison.identical and _bitwise(alone.logprobs, batched.logprobs[1:2])
    verdict, reason = (FAIL, _bug_flips_reason(comparison)) if comparison.bug_flips else (PASS, "")
    return Record(f"{PROPERTY}.batch_invariance", subject, f"row1_of_{len(batch)}_padded", _dtype_name(dtype),
                  verdict, error=float(comparison.bug_flips), tolerance=0.0, reason=reason,
                  shapes=_shapes(batch), extra={"bitwise": bitwise, "max_logprob_diff": logprob_diff,
                                                "comparison": comparison.as_dict()})


def check_dual_forward(model: torch.nn.Module, subject: str, token_ids: Sequence[Sequence[int]],
                       pad_id: int) -> Record:
    """verl's recomputed old_log_prob against the training forward's log-prob: the PPO ratio on-policy."""
    dtype, device = _model_dtype_device(model)
    claims, why = claims_determinism(device)
    rollout = run_pass(model, token_ids, pad_id, train=False, grad=False)
    training = run_pass(model, token_ids, pad_id, train=True, grad=True)
    comparison = compare_routing(rollout.routing, training.routing, dtype=dtype, names=("rollout", "training"))
    log_ratio = torch.cat([new.detach().cpu().double() - old.cpu().double()
                           for new, old in zip(training.logprobs, rollout.logprobs)])
    ratio_deviation = (log_ratio.exp() - 1).abs().max().item()
    bitwise = comparison.identical and ratio_deviation == 0.0
    if comparison.bug_flips:
        verdict, reason = FAIL, _bug_flips_reason(comparison)
    elif claims and not bitwise:
        verdict, reason = FAIL, (f"the path claims determinism ({why}) but the training forward differs from the "
                                 f"rollout pass: {comparison.flips} route flips, max |ratio - 1| {ratio_deviation:.3g}")
    else:
        verdict, reason = PASS, ""
    return Record(f"{PROPERTY}.dual_forward", subject, "eval_nograd_then_train_grad", _dtype_name(dtype), verdict,
                  error=ratio_deviation, tolerance=0.0 if claims else None, reason=reason, shapes=_shapes(token_ids),
                  extra={"claims_determinism": claims, "why": why, "max_abs_log_ratio": log_ratio.abs().max().item(),
                         "mean_abs_log_ratio": log_ratio.abs().mean().item(), "comparison": comparison.as_dict()})


def agreement_record(comparison: RoutingComparison, check: str = "trainer_vs_engine",
                     shapes: dict | None = None) -> Record:
    """A comparison of two sides as a Record; fails on large-gap flips."""
    verdict, reason = (FAIL, _bug_flips_reason(comparison)) if comparison.bug_flips else (PASS, "")
    return Record(f"{PROPERTY}.{check}", f"{comparison.b} vs {comparison.a}", f"{comparison.tokens}_tokens",
                  _dtype_name(comparison.dtype), verdict, error=float(comparison.bug_flips), tolerance=0.0,
                  reason=reason, shapes=shapes or {}, extra={"comparison": comparison.as_dict()})


def engine_error_record(check: str, subject: str, exc: BaseException, shapes: dict | None = None) -> Record:
    """A check that an engine's failure ended (its process died, hung or answered wrong; the reason ends with the
    engine's log tail)."""
    return Record(f"{PROPERTY}.{check}", subject, "engine_failed", "", ERROR, reason=str(exc), shapes=shapes or {})


def check_agreement(a: Sequence[Routing], b: Sequence[Routing], names: tuple[str, str], dtype: torch.dtype,
                    shapes: dict | None = None, check: str = "trainer_vs_engine") -> Record:
    """Routes of two sides (a first: the more precise, whose logits give the gaps)."""
    return agreement_record(compare_routing(a, b, dtype=dtype, names=names), check, shapes)


def runner_up_routes(routes: Sequence[Routing]) -> list[Routing]:
    """Each token's top-k with its k-th expert replaced by the (k+1)-th: differs from the routes at every token."""
    out = []
    for routing in routes:
        layers = []
        for logits, ids in zip(routing.router_logits, routing.expert_ids):
            top = torch.topk(logits.detach().cpu().double(), ids.shape[1] + 1, dim=-1).indices
            layers.append(torch.cat([top[:, : ids.shape[1] - 1], top[:, ids.shape[1]:]], dim=-1))
        out.append(Routing(expert_ids=layers, router_logits=routing.router_logits))
    return out


def _mean_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    diffs = [(x.detach().cpu().double() - y.detach().cpu().double()).abs() for x, y in zip(a, b)]
    return torch.cat(diffs).mean().item()


def check_replay(model: torch.nn.Module, subject: str, token_ids: Sequence[Sequence[int]], pad_id: int,
                 engine: str, engine_routes: Sequence[Routing], engine_logprobs: Sequence[torch.Tensor],
                 replay=RouterReplay) -> Record:
    """Forces the engine's routes in the training forward. Passes when (1) the experts ran exactly the recorded
    routes, and also the runner-up routes (which differ from the model's own at every token, so a replay that
    is ignored cannot pass); (2) every router gets a non-zero finite gradient; (3) the mean |dlogp| against the
    engine drops below the no-replay value, when routes differed without replay.

    engine_logprobs[i]: log p(token_t | tokens_<t) for t >= 1 of sequence i, as the engine computed them."""
    dtype, _ = _model_dtype_device(model)
    own = run_pass(model, token_ids, pad_id, train=True, grad=False)
    without = compare_routing(engine_routes, own.routing, dtype=dtype, names=(engine, subject))
    problems, extra = [], {"without_replay": without.as_dict()}
    try:
        forced = replayed_pass(model, token_ids, pad_id, engine_routes, train=True, grad=True, replay=replay)
        probe_routes = runner_up_routes(own.routing)
        probe = replayed_pass(model, token_ids, pad_id, probe_routes, train=True, grad=False, replay=replay)
    except RlparityError as exc:
        return Record(f"{PROPERTY}.replay", subject, f"routes_of_{engine}", _dtype_name(dtype), FAIL, reason=str(exc),
                      shapes=_shapes(token_ids), extra=extra)
    for name, captured, recorded in (("engine", forced.routing, engine_routes), ("runner-up", probe.routing,
                                                                                   probe_routes)):
        wrong = forced_mismatches(captured, recorded)
        extra[f"{name}_routes_mismatched_tokens"] = wrong
        if wrong:
            problems.append(f"with the {name} routes forced, {wrong} (token, layer) pairs ran other experts")
    gradients = router_gradient_norms(model, -torch.cat(forced.logprobs).sum())
    extra["router_grad_norms"] = gradients
    if bad := [i for i, norm in enumerate(gradients) if not (norm > 0 and torch.isfinite(torch.tensor(norm)))]:
        problems.append(f"router parameters of layers {bad} got no (or a non-finite) gradient through the replay")
    before = _mean_abs_diff(own.logprobs, engine_logprobs)
    after = _mean_abs_diff(forced.logprobs, engine_logprobs)
    extra |= {"mean_abs_dlogp_without": before, "mean_abs_dlogp_with": after,
              "max_abs_dlogp_without": _max_logprob_diff(own.logprobs, engine_logprobs),
              "max_abs_dlogp_with": _max_logprob_diff(forced.logprobs, engine_logprobs),
              "improvement_applicable": without.flips > 0}
    if without.flips and not after < before:
        problems.append(f"replay did not bring the log-probs closer to {engine}: mean |dlogp| {after:.3g} with "
                        f"replay, {before:.3g} without ({without.flips} route flips to remove)")
    return Record(f"{PROPERTY}.replay", subject, f"routes_of_{engine}", _dtype_name(dtype),
                  FAIL if problems else PASS, error=after, tolerance=before if without.flips else None,
                  reason="; ".join(problems), shapes=_shapes(token_ids), extra=extra)


def precision_record(comparison: RoutingComparison, subject: str, shapes: dict | None = None) -> Record:
    verdict, reason = (FAIL, _bug_flips_reason(comparison)) if comparison.bug_flips else (PASS, "")
    return Record(f"{PROPERTY}.router_precision", subject, "router_bf16_vs_fp32_same_inputs",
                  _dtype_name(comparison.dtype), verdict, error=float(comparison.bug_flips), tolerance=0.0,
                  reason=reason, shapes=shapes or {}, extra={"comparison": comparison.as_dict()})


def check_router_precision(model: torch.nn.Module, subject: str, token_ids: Sequence[Sequence[int]],
                           pad_id: int) -> Record:
    return precision_record(router_precision(model, token_ids, pad_id, where=subject), subject, _shapes(token_ids))
