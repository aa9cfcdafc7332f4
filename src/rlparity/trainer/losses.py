"""The policy-gradient pieces, one function per quantity, on flat per-token tensors of the trained tokens.

    ratio_t      = exp(logp_t - old_logp_t)
    pg_t         = -min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t)          PPO-clip
    k1_t         = logp_t - ref_logp_t                                              KL(pi || ref) estimators
    k3_t         = exp(ref_logp_t - logp_t) - 1 - (ref_logp_t - logp_t)             (Schulman), on tokens of pi
    w_t          = exp(old_logp_t - rollout_logp_t)                                 rollout -> trainer correction
        tis: min(w_t, cap)        mis: 1 if 1/cap <= w_t <= cap else 0 (the token is dropped)
"""

import torch

from rlparity.errors import RlparityError

# GRPO's advantage divides by the group's reward std; verl adds this epsilon so an all-equal group gives 0.
ADVANTAGE_EPSILON = 1e-6
CORRECTIONS = ("none", "tis", "mis")
KL_ESTIMATORS = ("k1", "k3")


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO: each reward standardised within its group of `group` consecutive samples of one prompt. [N] -> [N]"""
    if rewards.numel() % group:
        raise RlparityError(f"group_advantages: {rewards.numel()} rewards do not split into groups of {group}")
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + ADVANTAGE_EPSILON)).reshape(-1)


def baseline_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """PPO without a value model: the reward minus the batch's mean reward. [N] -> [N]"""
    return rewards - rewards.mean()


def ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    return torch.exp(logp - old_logp)


def clipped_policy_loss(logp, old_logp, advantages, clip_epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss [T], per-token clipped flag [T]: the clipped term was the smaller one)."""
    r = ratio(logp, old_logp)
    unclipped = r * advantages
    clipped = r.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1 - log_r


def kl_penalty(logp, ref_logp, estimator: str) -> torch.Tensor:
    if estimator not in KL_ESTIMATORS:
        raise RlparityError(f"kl estimator {estimator!r}: expected one of {KL_ESTIMATORS}")
    return kl_k1(logp, ref_logp) if estimator == "k1" else kl_k3(logp, ref_logp)


def rollout_correction(old_logp, rollout_logp, mode: str, cap: float) -> torch.Tensor:
    """Per-token weights [T] (no gradient) correcting for the engine sampling from a slightly different policy."""
    if mode not in CORRECTIONS:
        raise RlparityError(f"correction {mode!r}: expected one of {CORRECTIONS}")
    if mode == "none":
        return torch.ones_like(old_logp)
    if not cap > 1:
        raise RlparityError(f"correction {mode}: the cap must be > 1, got {cap}")
    w = torch.exp(old_logp - rollout_logp).detach()
    if mode == "tis":
        return w.clamp(max=cap)
    return ((w >= 1 / cap) & (w <= cap)).to(w.dtype)
