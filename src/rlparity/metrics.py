"""Error measures and the tolerance policy every numerical check uses.

The rule (FlashAttention's own tests): a candidate's error against the float64 reference must be at
most k x the error of the naive PyTorch implementation run in the candidate's dtype, plus a floor.
The naive error scales the tolerance with dtype, shape and magnitude, so no case is tuned by hand.
The floor is what no implementation returning that dtype can avoid: rounding the exact answer.
"""

import math

import torch

# FlashAttention's tests accept a forward error of at most 2x the naive same-dtype error.
K_FORWARD = 2.0
# ... and 2-3x for gradients, whose longer reductions add rounding the naive autograd path orders
# differently; we take the upper end.
K_BACKWARD = 3.0
# The floor is this many half-ulps at the largest magnitude of the exact answer (one ulp): the
# worst case of merely rounding it to the output dtype, with one rounding of slack. Half an ulp is
# deterministic, where the actual rounding error of a few values can be near zero by luck.
FLOOR_ROUNDINGS = 2.0


def max_abs_error(candidate: torch.Tensor, exact: torch.Tensor) -> float:
    return (candidate.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of one rounding to `dtype`."""
    return torch.finfo(dtype).eps / 2


def half_ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The largest error of rounding a value of this magnitude to `dtype`."""
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return 0.0
    return unit_roundoff(dtype) * 2.0 ** math.floor(math.log2(magnitude)) * 2


def rounding_floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    magnitude = exact.double().abs().max().item() if exact.numel() else 0.0
    return FLOOR_ROUNDINGS * half_ulp(magnitude, dtype)


def tolerance(naive_error: float, floor: float, k: float) -> float:
    return k * naive_error + floor


# --- Per-token log-prob agreement between a trainer and a rollout engine (rlparity.parity) ----------------------
#
# Convention (verl's rollout-vs-actor metrics): tokens come from the rollout engine, so the importance ratio is
# r = pi_trainer / pi_engine = exp(logp_trainer - logp_engine), exactly 1 when both sides agree, and
# KL(pi_engine || pi_trainer) is estimated per token by k1 = -log r and k3 = r - 1 - log r (Schulman's estimators).

# The PPO clip range most RL recipes use, and a band so narrow that only numerics can move a ratio out of it.
RATIO_EPSILONS = (0.2, 0.001)
AGREEMENT_QUANTILE = 0.99


def ratio_outside_key(epsilon: float) -> str:
    return f"ratio_outside_{epsilon:g}"


# Token fractions: a deviation can never exceed 1.
FRACTION_METRICS = tuple(ratio_outside_key(e) for e in RATIO_EPSILONS)
AGREEMENT_METRICS = ("dlogp_mean", "dlogp_p99", "dlogp_max", "kl_k1", "kl_k3", "ratio_mean", "ratio_std",
                     *(ratio_outside_key(e) for e in RATIO_EPSILONS), "prob_pearson")
# How each metric's distance from perfect agreement grows with a small log-prob error d: linearly (|d|),
# quadratically (k3 ~ d^2 / 2, 1 - Pearson ~ d^2), or as a count of tokens (the fractions outside a band).
FIRST_ORDER = ("dlogp_mean", "dlogp_p99", "dlogp_max", "kl_k1", "ratio_mean", "ratio_std")
SECOND_ORDER = ("kl_k3", "prob_pearson")


def _flat(values) -> torch.Tensor:
    tensors = [torch.as_tensor(v).double().reshape(-1) for v in values] if isinstance(values, (list, tuple)) else [
        torch.as_tensor(values).double().reshape(-1)]
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.float64)


def logprob_agreement(trainer, engine) -> dict[str, float]:
    """Agreement of per-token log-probs (tensors, or lists of per-sequence tensors, of equal total length).

    dlogp_*: |logp_trainer - logp_engine| mean, 99th percentile, max; kl_k1, kl_k3: mean estimators of
    KL(engine || trainer); ratio_*: the importance ratio's mean, std and fraction outside [1 - e, 1 + e];
    prob_pearson: Pearson correlation of the two sides' token probabilities.
    """
    a, b = _flat(trainer), _flat(engine)
    if a.shape != b.shape:
        raise ValueError(f"logprob_agreement: the trainer gave {a.numel()} log-probs, the engine {b.numel()}")
    if a.numel() == 0:
        raise ValueError("logprob_agreement: no log-probs to compare")
    for side, values in (("trainer", a), ("engine", b)):
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            raise ValueError(f"logprob_agreement: the {side}'s log-prob {bad[0].item()} is {values[bad[0]].item()} "
                             f"({len(bad)} non-finite of {values.numel()}); compare finite log-probs only")
    delta = a - b
    ratio = torch.exp(delta)
    pa, pb = a.exp(), b.exp()
    stats = {
        "tokens": a.numel(),
        "dlogp_mean": delta.abs().mean().item(),
        "dlogp_p99": torch.quantile(delta.abs(), AGREEMENT_QUANTILE).item(),
        "dlogp_max": delta.abs().max().item(),
        "kl_k1": (-delta).mean().item(),
        "kl_k3": (ratio - 1 - delta).mean().item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_std": ratio.std(unbiased=False).item(),
    }
    for epsilon in RATIO_EPSILONS:
        stats[ratio_outside_key(epsilon)] = ((ratio - 1).abs() > epsilon).double().mean().item()
    centred_a, centred_b = pa - pa.mean(), pb - pb.mean()
    norm = centred_a.norm() * centred_b.norm()
    # Equal constant vectors agree perfectly; a constant against a varying one has no correlation to speak of.
    stats["prob_pearson"] = (centred_a @ centred_b / norm).item() if norm > 0 else float(torch.equal(pa, pb))
    return stats


def agreement_deviations(stats: dict[str, float]) -> dict[str, float]:
    """Each metric's distance from perfect agreement (0 for identical log-probs), so one rule bounds them all."""
    deviations = {name: abs(stats[name]) for name in AGREEMENT_METRICS}
    deviations["ratio_mean"] = abs(stats["ratio_mean"] - 1)
    deviations["prob_pearson"] = max(0.0, 1 - stats["prob_pearson"])  # rounding can put Pearson a hair above 1
    return deviations


def cannot_fail(tolerances: dict[str, float]) -> list[str]:
    """The metrics whose tolerance is at least the largest deviation they can take: at this precision the noise
    floor alone fills them (bfloat16 rounding alone puts 67 % of the tiny batch's ratios outside 1 +- 0.001, and
    the tolerance is twice that), so passing them says nothing. Reported with the verdict, not counted as evidence.
    """
    return [name for name in FRACTION_METRICS if tolerances.get(name, 0.0) >= 1.0]


def agreement_tolerances(floor: dict[str, float], rounding: float, k: float = K_FORWARD) -> dict[str, float]:
    """k x the measured noise floor of each metric's deviation, plus what rounding alone can cause.

    `rounding` bounds the log-prob error of merely delivering the log-probs in their dtype (rounding_floor);
    first-order metrics may move by that much, second-order ones by its square, token fractions not at all.
    """
    allowance = {name: rounding for name in FIRST_ORDER} | {name: rounding ** 2 for name in SECOND_ORDER}
    return {name: tolerance(floor[name], allowance.get(name, 0.0), k) for name in AGREEMENT_METRICS}
