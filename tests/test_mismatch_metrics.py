"""The frameworks' mismatch metrics (rlparity.mismatch_metrics) against their closed forms.

verl's are also checked against verl's own code in test_mismatch_metrics_verl.py; slime and NeMo-RL cannot be
imported without their GPU stacks, so their definitions are checked here on hand-computed cases.
"""

import math

import pytest
import torch

from rlparity.mismatch_metrics import VERL_IS_THRESHOLD, framework_metrics, per_sequence

# Two sequences of unequal length, so per-sequence and per-token averages differ.
ENGINE = [torch.log(torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)),
          torch.log(torch.tensor([0.9], dtype=torch.float64))]
DELTAS = [torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)]
TRAINER = [e + d for e, d in zip(ENGINE, DELTAS)]


def test_identical_logprobs_are_perfect_agreement_in_every_framework():
    metrics = framework_metrics(ENGINE, [e.clone() for e in ENGINE])
    perfect = {"rollout_corr/kl": 0, "rollout_corr/k3_kl": 0, "rollout_corr/log_ppl_diff": 0,
               "rollout_corr/log_ppl_abs_diff": 0, "rollout_corr/ppl_ratio": 1, "rollout_corr/chi2_token": 0,
               "rollout_corr/chi2_seq": 0, "training/rollout_probs_diff_max": 0,
               "training/rollout_actor_probs_pearson_corr": 1, "train/train_rollout_logprob_abs_diff": 0,
               "train/token_mult_prob_error": 1}
    for level in ("token", "sequence"):
        perfect |= {f"rollout_corr/{level}/rollout_is_{name}": value for name, value in
                    (("mean", 1), ("max", 1), ("min", 1), ("std", 0), ("eff_sample_size", 1), ("seq_std", 0),
                     ("seq_max_deviation", 0), ("ratio_fraction_high", 0), ("ratio_fraction_low", 0))}
    for name, value in perfect.items():
        assert metrics[name] == pytest.approx(value, abs=1e-15), name


def test_token_and_sequence_averages_follow_each_framework():
    metrics = framework_metrics(TRAINER, ENGINE)
    d = torch.cat(DELTAS)
    # slime: the mean over sequences of each one's mean |dlogp|; NeMo-RL: the mean over tokens of exp|dlogp|
    assert metrics["train/train_rollout_logprob_abs_diff"] == pytest.approx((0.6 / 3 + 0.4) / 2)
    assert metrics["train/token_mult_prob_error"] == pytest.approx(d.abs().exp().mean().item())
    # verl: kl over tokens of log pi_rollout - log pi_training; log-ppl difference per sequence, then averaged
    assert metrics["rollout_corr/kl"] == pytest.approx(-d.mean().item())
    assert metrics["rollout_corr/k3_kl"] == pytest.approx((d.exp() - d - 1).mean().item())
    per_sequence_diff = [-0.2 / 3, -0.4]
    assert metrics["rollout_corr/log_ppl_diff"] == pytest.approx(sum(per_sequence_diff) / 2)
    assert metrics["rollout_corr/log_ppl_diff_min"] == pytest.approx(-0.4)
    assert metrics["rollout_corr/ppl_ratio"] == pytest.approx(sum(math.exp(x) for x in per_sequence_diff) / 2)
    assert metrics["rollout_corr/chi2_token"] == pytest.approx((2 * d).exp().mean().item() - 1)
    assert metrics["rollout_corr/chi2_seq"] == pytest.approx((math.exp(2 * 0.2) + math.exp(2 * 0.4)) / 2 - 1)
    p_training, p_rollout = torch.cat(TRAINER).exp(), torch.cat(ENGINE).exp()
    assert metrics["training/rollout_probs_diff_max"] == pytest.approx((p_training - p_rollout).abs().max().item())


def test_sequence_weights_are_products_truncated_at_the_threshold():
    engine = [torch.zeros(2, dtype=torch.float64) - 1, torch.zeros(1, dtype=torch.float64) - 1]
    log_ratios = [math.log(1.5), math.log(1.5), math.log(0.25)]  # sequence weights 2.25 (truncated) and 0.25
    trainer = [engine[0] + torch.tensor(log_ratios[:2]), engine[1] + torch.tensor(log_ratios[2:])]
    metrics = framework_metrics(trainer, engine)
    assert metrics["rollout_corr/sequence/rollout_is_max"] == pytest.approx(2.25)  # verl: before truncation
    assert metrics["rollout_corr/sequence/rollout_is_min"] == pytest.approx(0.25)
    # the mean is over tokens: the two-token sequence counts twice
    assert metrics["rollout_corr/sequence/rollout_is_mean"] == pytest.approx((2 * VERL_IS_THRESHOLD + 0.25) / 3)
    assert metrics["rollout_corr/sequence/rollout_is_ratio_fraction_high"] == 0.5
    assert metrics["rollout_corr/sequence/rollout_is_ratio_fraction_low"] == 0.5
    assert metrics["rollout_corr/token/rollout_is_max"] == pytest.approx(1.5)
    weights = torch.tensor([1.5, 1.5, 0.25])
    ess = 1 / ((weights / weights.mean()) ** 2).mean().item()
    assert metrics["rollout_corr/token/rollout_is_eff_sample_size"] == pytest.approx(ess)


def test_a_sequence_without_response_tokens_is_left_out():
    with_empty = framework_metrics([TRAINER[0], torch.zeros(0), TRAINER[1]], [ENGINE[0], torch.zeros(0), ENGINE[1]])
    assert with_empty == framework_metrics(TRAINER, ENGINE)


def test_flat_tokens_split_by_their_sequence():
    flat = torch.arange(6.0)
    assert [t.tolist() for t in per_sequence(flat, torch.tensor([0, 0, 0, 2, 2, 5]))] == [[0, 1, 2], [3, 4], [5]]


@pytest.mark.parametrize("trainer, engine, expected", [
    ([torch.zeros(2)], [torch.zeros(3)], "the trainer gave [2] log-probs per sequence, the engine [3]"),
    ([torch.tensor([0.0, math.nan])], [torch.zeros(2)], "the trainer's log-probs are not all finite"),
    ([torch.zeros(0)], [torch.zeros(0)], "no log-probs to compare"),
    ([], [], "no log-probs to compare"),
], ids=["lengths", "nan", "empty-sequences", "no-sequences"])
def test_unusable_inputs_are_refused(trainer, engine, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        framework_metrics(trainer, engine)
