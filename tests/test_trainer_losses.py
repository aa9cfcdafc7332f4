"""The policy-gradient pieces against hand-computed values."""

import math

import pytest
import torch

from rlparity.errors import RlparityError
from rlparity.trainer.losses import (
    ADVANTAGE_EPSILON,
    baseline_advantages,
    clipped_policy_loss,
    group_advantages,
    kl_k1,
    kl_k3,
    rollout_correction,
)


def test_group_advantages_standardise_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(0.1875)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + ADVANTAGE_EPSILON)
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # an all-equal group teaches nothing
    with pytest.raises(RlparityError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_baseline_advantages():
    torch.testing.assert_close(baseline_advantages(torch.tensor([1.0, 0.0])), torch.tensor([0.5, -0.5]))


def test_clipped_loss_and_clip_flag():
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.2, 0.8, 1.5]))
    assert clipped.tolist() == [False, True, True, False]


def test_ratio_exactly_one_gives_no_clipping():
    logp = torch.randn(50, generator=torch.Generator().manual_seed(0))
    loss, clipped = clipped_policy_loss(logp, logp.detach(), torch.randn(50), 0.2)
    assert not clipped.any()


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.5 - 1 + math.log(2)]))
    assert kl_k3(ref, ref).item() == 0.0


def test_rollout_corrections():
    old = torch.log(torch.tensor([1.0, 3.0, 0.25, 1.5]))
    rollout = torch.zeros(4)
    assert torch.equal(rollout_correction(old, rollout, "none", 2.0), torch.ones(4))
    torch.testing.assert_close(rollout_correction(old, rollout, "tis", 2.0), torch.tensor([1.0, 2.0, 0.25, 1.5]))
    assert rollout_correction(old, rollout, "mis", 2.0).tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(RlparityError, match="expected one of"):
        rollout_correction(old, rollout, "is", 2.0)
