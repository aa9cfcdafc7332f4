"""The log-prob agreement metrics against their closed forms (rlparity.metrics.logprob_agreement)."""

import math

import pytest
import torch

from rlparity.metrics import (
    AGREEMENT_METRICS,
    agreement_deviations,
    agreement_tolerances,
    logprob_agreement,
    ratio_outside_key,
)


def test_identical_logprobs_agree_perfectly():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.9, 0.01]))
    stats = logprob_agreement([logp[:2], logp[2:]], [logp[:3], logp[3:]])  # sequence splits do not matter
    assert stats["tokens"] == 4
    assert all(value == 0 for name, value in agreement_deviations(stats).items()), stats


def test_a_constant_shift_gives_the_closed_forms():
    delta = 0.01  # the trainer is higher by delta everywhere: ratio = e^delta at every token
    engine = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64))
    stats = logprob_agreement(engine + delta, engine)
    assert stats["dlogp_mean"] == pytest.approx(delta) and stats["dlogp_max"] == pytest.approx(delta)
    assert stats["dlogp_p99"] == pytest.approx(delta)
    assert stats["kl_k1"] == pytest.approx(-delta)
    assert stats["kl_k3"] == pytest.approx(math.exp(delta) - 1 - delta)
    assert stats["ratio_mean"] == pytest.approx(math.exp(delta)) and stats["ratio_std"] == pytest.approx(0, abs=1e-15)
    assert stats[ratio_outside_key(0.2)] == 0 and stats[ratio_outside_key(0.001)] == 1
    assert stats["prob_pearson"] == pytest.approx(1)  # p_trainer = e^delta p_engine: perfectly correlated


def test_fractions_outside_the_band_count_tokens():
    engine = torch.zeros(4, dtype=torch.float64) - 1
    trainer = engine + torch.tensor([0.0, 0.0005, 0.1, math.log(1.3)], dtype=torch.float64)
    stats = logprob_agreement(trainer, engine)
    assert stats[ratio_outside_key(0.2)] == 0.25 and stats[ratio_outside_key(0.001)] == 0.5


def test_tolerances_scale_each_floor_and_add_rounding_by_order():
    floor = dict.fromkeys(AGREEMENT_METRICS, 1e-6)
    tolerances = agreement_tolerances(floor, rounding=1e-7, k=2.0)
    assert tolerances["dlogp_max"] == pytest.approx(2e-6 + 1e-7)
    assert tolerances["kl_k3"] == pytest.approx(2e-6 + 1e-14)
    assert tolerances[ratio_outside_key(0.001)] == pytest.approx(2e-6)  # a count of tokens has no rounding


@pytest.mark.parametrize("trainer, engine, message", [
    ([0.0, -1.0], [0.0], "the trainer gave 2 log-probs, the engine 1"),
    ([0.0, -math.inf], [0.0, -1.0], "the trainer's log-prob 1 is -inf"),
    ([], [], "no log-probs to compare"),
], ids=["lengths", "non_finite", "empty"])
def test_unusable_input_is_named(trainer, engine, message):
    with pytest.raises(ValueError, match=message):
        logprob_agreement(torch.tensor(trainer), torch.tensor(engine))
