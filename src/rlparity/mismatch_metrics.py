"""The train-rollout mismatch metrics RL frameworks put on their dashboards, from one pair of log-prob sets.

    framework_metrics(trainer, engine)  # per-sequence log-prob tensors of the response tokens, in the same order

Each framework computes its own way; the definitions below follow their public source (cited per function), with
the framework's name as the key, so a number here reads like the one on the user's dashboard:

    rollout_corr/*                            verl's off-policy diagnostics (kl, k3_kl, ppl, chi2)
    rollout_corr/{token,sequence}/rollout_is_*  verl's importance-weight statistics at each aggregation level (verl
                                              logs rollout_corr/rollout_is_* for the level it is configured with;
                                              its default is sequence)
    training/rollout_probs_diff_*, training/rollout_actor_probs_pearson_corr  verl's debug metrics
    train/train_rollout_logprob_abs_diff      slime
    train/token_mult_prob_error               NeMo-RL

Convention (verl's): the trainer's log-probs are pi_training, the engine's pi_rollout, the tokens come from the
rollout, and the importance weight is rho = pi_training / pi_rollout. Everything is computed in float64. Where a
framework guards a division with a small epsilon, rlparity divides exactly.
"""

import math
from collections.abc import Sequence

import torch

# verl clamps log importance ratios to +-20 before exponentiating (rollout_corr_helper.SAFETY_BOUND).
VERL_SAFETY_BOUND = 20.0
# verl's default truncation of importance weights (RolloutCorrectionConfig.rollout_is_threshold); the lower bound for
# the "fraction low" statistics is its reciprocal.
VERL_IS_THRESHOLD = 2.0
IS_LEVELS = ("token", "sequence")


def padded(values: Sequence[torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence 1-D tensors -> (values [B, L] float64, zero where padded; mask [B, L] bool)."""
    lengths = [int(torch.as_tensor(v).numel()) for v in values]
    if not any(lengths):
        raise ValueError(f"{where}: no log-probs to compare")
    out = torch.zeros(len(values), max(lengths), dtype=torch.float64)
    mask = torch.zeros(out.shape, dtype=torch.bool)
    for row, v in enumerate(values):
        out[row, : lengths[row]] = torch.as_tensor(v).double().reshape(-1)
        mask[row, : lengths[row]] = True
    return out, mask


def per_sequence(flat: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
    """Token values [T] with each token's sequence index [T] (non-decreasing) -> one tensor per sequence present."""
    counts = torch.unique_consecutive(rows, return_counts=True)[1]
    return list(torch.split(flat, counts.tolist()))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return x[mask].mean()
    return torch.where(mask, x, 0.0).sum(dim) / mask.sum(dim)


def verl_offpolicy(training: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """verl 0.9.1 verl/trainer/ppo/rollout_corr_helper.py, compute_offpolicy_metrics: KL(pi_rollout || pi_training)
    by the direct and the k3 estimator over tokens; perplexities as batch means of per-sequence exp(-mean log-prob);
    chi2 = E[rho^2] - 1 over tokens and over sequences (rho = product over the sequence)."""
    log_ratio = torch.where(mask, training - rollout, 0.0)
    mean_training, mean_rollout = masked_mean(training, mask, -1), masked_mean(rollout, mask, -1)  # [B]
    log_ppl_diff = mean_rollout - mean_training  # log(training ppl / rollout ppl) per sequence
    bounded = log_ratio.clamp(-VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)
    sequence_log_ratio = log_ratio.sum(-1).clamp(-VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)
    metrics = {
        "training_ppl": torch.exp(-mean_training).mean(),
        "training_log_ppl": (-mean_training).mean(),
        "kl": masked_mean(-log_ratio, mask),
        "k3_kl": masked_mean(log_ratio.exp() - log_ratio - 1, mask),
        "rollout_ppl": torch.exp(-mean_rollout).mean(),
        "rollout_log_ppl": (-mean_rollout).mean(),
        "log_ppl_diff": log_ppl_diff.mean(),
        "log_ppl_abs_diff": log_ppl_diff.abs().mean(),
        "log_ppl_diff_max": log_ppl_diff.max(),
        "log_ppl_diff_min": log_ppl_diff.min(),
        "ppl_ratio": log_ppl_diff.exp().mean(),
        "chi2_token": masked_mean(bounded.exp().square(), mask) - 1,
        "chi2_seq": (2 * sequence_log_ratio).exp().mean() - 1,
    }
    return {f"rollout_corr/{name}": value.item() for name, value in metrics.items()}


def verl_importance_weights(training: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, level: str,
                            threshold: float = VERL_IS_THRESHOLD) -> dict[str, float]:
    """verl 0.9.1 rollout_corr_helper.py, compute_rollout_correction_weights + compute_is_metrics (truncated IS, no
    batch normalisation): token weights rho_t, or one weight per sequence (the product of its rho_t) given to each of
    its tokens; truncated at `threshold`. mean, std and the effective sample size 1 / E[(w / E[w])^2] are over
    tokens of the truncated weights; max and min are of the truncated weights (token level) or of the untruncated
    sequence weights (sequence level); the fractions high / low count weights above threshold / below 1 / threshold;
    seq_* are statistics of each sequence's mean weight."""
    if level not in IS_LEVELS:
        raise ValueError(f"importance weights: level {level!r}, expected one of {IS_LEVELS}")
    low = 1.0 / threshold
    log_ratio = torch.where(mask, training - rollout, 0.0)
    if level == "token":
        raw = log_ratio.clamp(-VERL_SAFETY_BOUND, VERL_SAFETY_BOUND).exp()
    else:
        sequence_log_ratio = log_ratio.sum(-1, keepdim=True)  # [B, 1]
        raw = sequence_log_ratio.clamp(-VERL_SAFETY_BOUND, VERL_SAFETY_BOUND).exp().expand_as(log_ratio)
    raw = torch.where(mask, raw, 0.0)
    weights = raw.clamp(max=threshold)
    mean = masked_mean(weights, mask)
    metrics = {"rollout_is_mean": mean}
    if level == "token":
        metrics |= {"rollout_is_max": weights[mask].max(), "rollout_is_min": weights[mask].min(),
                    "rollout_is_ratio_fraction_high": masked_mean((raw > threshold).double(), mask),
                    "rollout_is_ratio_fraction_low": masked_mean((raw < low).double(), mask)}
    else:
        metrics |= {"rollout_is_max": sequence_log_ratio.max().clamp(max=VERL_SAFETY_BOUND).exp(),
                    "rollout_is_min": sequence_log_ratio.min().exp(),
                    "rollout_is_ratio_fraction_high": (sequence_log_ratio > math.log(threshold)).double().mean(),
                    "rollout_is_ratio_fraction_low": (sequence_log_ratio < math.log(low)).double().mean()}
    variance = (masked_mean(weights.square(), mask) - mean.square()).clamp(min=0)
    metrics["rollout_is_std"] = variance.sqrt() if mask.sum() > 1 else torch.tensor(0.0)
    metrics["rollout_is_eff_sample_size"] = 1 / masked_mean((weights / mean).square(), mask)
    sequence_mean, raw_sequence_mean = masked_mean(weights, mask, -1), masked_mean(raw, mask, -1)
    metrics |= {
        "rollout_is_seq_mean": sequence_mean.mean(),
        "rollout_is_seq_std": sequence_mean.std() if len(sequence_mean) > 1 else torch.tensor(0.0),
        "rollout_is_seq_max": sequence_mean.max(),
        "rollout_is_seq_min": sequence_mean.min(),
        "rollout_is_seq_max_deviation": (sequence_mean - 1).abs().max(),
        "rollout_is_seq_fraction_high": (raw_sequence_mean > threshold).double().mean(),
        "rollout_is_seq_fraction_low": (raw_sequence_mean < low).double().mean(),
    }
    return {f"rollout_corr/{level}/{name}": float(value) for name, value in metrics.items()}


def verl_probs_diff(training: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """verl 0.9.1 verl/utils/debug/metrics.py, calculate_debug_metrics: |p_training - p_rollout| of the token
    probabilities (max, mean, unbiased std) and the Pearson correlation of the two sides' probabilities."""
    p_training, p_rollout = training[mask].exp(), rollout[mask].exp()
    diff = (p_training - p_rollout).abs()
    return {"training/rollout_probs_diff_max": diff.max().item(),
            "training/rollout_probs_diff_mean": diff.mean().item(),
            "training/rollout_probs_diff_std": diff.std().item() if diff.numel() > 1 else math.nan,
            "training/rollout_actor_probs_pearson_corr": torch.corrcoef(torch.stack([p_training, p_rollout]))[0, 1]
            .item()}


def slime_logprob_abs_diff(training: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> float:
    """slime (THUDM/slime) slime/backends/megatron_utils/loss.py: train_rollout_logprob_abs_diff is
    sum_of_sample_mean(|old_log_probs - rollout_log_probs|) (cp_utils.get_sum_of_sample_mean: each sample's mean over
    its loss-masked tokens, summed), reported per sample: the mean over sequences of each sequence's mean |dlogp|."""
    return masked_mean((training - rollout).abs(), mask, -1).mean().item()


def nemo_rl_mult_prob_error(training: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> float:
    """NeMo-RL (NVIDIA-NeMo/RL) nemo_rl/algorithms/loss_functions.py, ClippedPGLossFn: token_mult_prob_error is the
    mean over all valid tokens of exp(|generation_logprobs - prev_logprobs|); 1 when the sides agree."""
    return masked_mean((training - rollout).abs().exp(), mask).item()


def framework_metrics(trainer: Sequence[torch.Tensor], engine: Sequence[torch.Tensor]) -> dict[str, float]:
    """Every metric above, keyed by the framework's name; `trainer` and `engine` hold one tensor of response-token
    log-probs per sequence (the sequence boundaries are what the per-sequence metrics average over). A sequence
    without response tokens has no per-sequence mean and is left out (verl would count its mean as 0)."""
    counts = ([torch.as_tensor(v).numel() for v in trainer], [torch.as_tensor(v).numel() for v in engine])
    if counts[0] != counts[1]:
        raise ValueError(f"framework metrics: the trainer gave {counts[0]} log-probs per sequence, the engine "
                         f"{counts[1]}")
    kept = [row for row, count in enumerate(counts[0]) if count]
    training, mask = padded([trainer[row] for row in kept], "framework metrics")
    rollout, _ = padded([engine[row] for row in kept], "framework metrics")
    for side, values in (("trainer", training), ("engine", rollout)):
        if not torch.isfinite(values[mask]).all():
            raise ValueError(f"framework metrics: the {side}'s log-probs are not all finite")
    metrics = verl_offpolicy(training, rollout, mask)
    for level in IS_LEVELS:
        metrics |= verl_importance_weights(training, rollout, mask, level)
    metrics |= verl_probs_diff(training, rollout, mask)
    metrics["train/train_rollout_logprob_abs_diff"] = slime_logprob_abs_diff(training, rollout, mask)
    metrics["train/token_mult_prob_error"] = nemo_rl_mult_prob_error(training, rollout, mask)
    return metrics
