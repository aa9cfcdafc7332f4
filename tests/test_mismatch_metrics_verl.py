"""rlparity's verl metrics against verl's own implementation on the same inputs (verl 0.9.1, imported on the CPU).

verl's rollout-correction helper imports without its GPU stack: `pip install --no-deps verl==0.9.1` plus ray,
tensordict, omegaconf, transformers, codetiming and orjson (what `nox -s frameworks` installs). Elsewhere this file
skips. Both sides compute in float64 on the same tensors, so they differ only where verl guards a division with an
epsilon that rlparity does not add (VERL_DIVISION_EPSILON below) and by float64 rounding.
"""

import math

import pytest
import torch

from rlparity.metrics import unit_roundoff
from rlparity.mismatch_metrics import IS_LEVELS, VERL_IS_THRESHOLD, framework_metrics, padded

rollout_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                                   reason="verl is not installed: nox -s frameworks installs verl==0.9.1 to run this")
verl_debug = pytest.importorskip("verl.utils.debug.metrics", reason="verl is not installed")
verl_protocol = pytest.importorskip("verl.protocol", reason="verl is not installed")

# verl_F.masked_mean divides by mask.sum() + 1e-8, and the effective sample size divides the weights by their mean +
# 1e-8: each such division moves a value by at most 1e-8 relative to its denominator (a token count, or the mean
# truncated weight).
VERL_DIVISION_EPSILON = 1e-8
# The most guarded divisions chained in one verl metric: the effective sample size (the weights' mean, the
# normalisation by it, the mean of the squares).
GUARDED_DIVISIONS = 3


def cross_check_tolerance(value: float, smallest_denominator: float, largest_exponent: float, tokens: int) -> float:
    """The most rlparity's exact value and verl's may differ: the guarded divisions' relative error, scaled up by
    an exponential of a mean log-prob (the perplexities; by at most 1 + its magnitude), plus float64 rounding of sums
    over `tokens` terms; relative to 1 + |value| so that E[rho^2] - 1 near 0 keeps the scale of E[rho^2]."""
    relative = GUARDED_DIVISIONS * VERL_DIVISION_EPSILON / smallest_denominator * (1 + largest_exponent)
    return (relative + tokens * unit_roundoff(torch.float64)) * (1 + abs(value))


def verl_metrics(trainer, engine) -> dict[str, float]:
    training, mask = padded(trainer, "trainer")
    rollout, _ = padded(engine, "engine")
    response_mask = mask.double()
    metrics = rollout_corr.compute_rollout_corr_metrics_from_logprobs(training, rollout, response_mask)
    for level in IS_LEVELS:
        _, weights = rollout_corr.compute_rollout_correction_weights(
            training - rollout, response_mask, rollout_is=level, rollout_is_threshold=VERL_IS_THRESHOLD)
        metrics |= {f"rollout_corr/{level}/{name}": value for name, value in weights.items()}
    data = verl_protocol.DataProto.from_dict({"rollout_log_probs": rollout, "old_log_probs": training,
                                              "response_mask": response_mask,
                                              "responses": torch.zeros(mask.shape, dtype=torch.long)})
    debug = verl_debug.calculate_debug_metrics(data)
    assert debug.pop("training/rollout_probs_diff_valid") == 1
    return metrics | debug


@pytest.mark.parametrize("spread", [0.02, 0.5], ids=["bf16-like", "off-policy"])
def test_verl_metrics_equal_verls_own(spread):
    generator = torch.Generator().manual_seed(17)
    lengths = (37, 5, 64, 12, 23)
    engine = [torch.log(torch.rand(n, generator=generator, dtype=torch.float64) * 0.98 + 0.01) for n in lengths]
    trainer = [e + spread * torch.randn(len(e), generator=generator, dtype=torch.float64) for e in engine]
    ours = framework_metrics(trainer, engine)
    theirs = verl_metrics(trainer, engine)
    assert set(theirs) <= set(ours), f"verl metrics rlparity lacks: {sorted(set(theirs) - set(ours))}"
    mean_weight = min(ours[f"rollout_corr/{level}/rollout_is_mean"] for level in IS_LEVELS)
    largest_exponent = max(max(ours["rollout_corr/training_log_ppl"], ours["rollout_corr/rollout_log_ppl"]),
                           abs(ours["rollout_corr/log_ppl_diff_min"]))
    failures = []
    for name, value in theirs.items():
        tolerance = cross_check_tolerance(value, min(min(lengths), mean_weight), largest_exponent, sum(lengths))
        if not math.isclose(ours[name], value, rel_tol=0, abs_tol=tolerance):
            failures.append(f"{name}: rlparity {ours[name]!r}, verl {value!r}, tolerance {tolerance:.2e}")
    assert not failures, "\n".join(failures)
    if spread > 0.1:  # the inputs reach the truncation and the thresholds, so those branches were compared too
        assert ours["rollout_corr/sequence/rollout_is_ratio_fraction_high"] > 0
        assert ours["rollout_corr/token/rollout_is_ratio_fraction_low"] > 0
