"""Drift of the train-rollout mismatch over a run's steps: what a rollout engine that falls behind the trainer shows.

Each step the trainer's first training pass runs on weights the engine was just synced to, so its mismatch with the
rollout's log-probs is numerical and stays at the first step's level however far the policy moves. An engine that
samples with older weights than it was sent (a sync applied a step late, a stale replica) adds the policy's movement
to it from the second step on. The measure is the one slime's users watch (`train/train_rollout_logprob_abs_diff`,
rlparity.mismatch_metrics); the bound is the tolerance policy's factor times the first step's worst token, since a
mean over new episodes can exceed the first step's mean but not, by more than rounding, its worst token.
"""

from collections.abc import Sequence

from rlparity.metrics import K_FORWARD
from rlparity.results import FAIL, PASS, Record

DRIFT_METRIC = "train/train_rollout_logprob_abs_diff"
DRIFT_K = K_FORWARD
# Reported beside the checked metric, so a drift reads in every framework's names.
DRIFT_SERIES = (DRIFT_METRIC, "rollout_corr/k3_kl", "rollout_corr/log_ppl_abs_diff", "train/token_mult_prob_error",
                "training/rollout_probs_diff_max")


def check_drift(history: Sequence[dict], subject: str, dtype: str) -> Record:
    """history: the trainer's per-step metrics in step order (Trainer.train()); at least two steps."""
    if len(history) < 2:
        raise ValueError(f"drift: a run of {len(history)} step(s) cannot drift; run at least 2")
    tolerance = DRIFT_K * history[0]["train_rollout_dlogp_max"]
    values = [m[DRIFT_METRIC] for m in history]
    worst_step = max(range(len(values)), key=values.__getitem__)
    passed = values[worst_step] <= tolerance
    reason = "" if passed else (
        f"the train-rollout mismatch drifts: {DRIFT_METRIC} {values[worst_step]:.3g} at step {worst_step}, expected "
        f"<= {tolerance:.3g} ({DRIFT_K:g} x the first step's largest |dlogp|); does the engine sample with the "
        f"weights it was last sent?")
    return Record("trainer.mismatch_drift", subject, f"{len(history)} steps", dtype, PASS if passed else FAIL,
                  error=values[worst_step], tolerance=tolerance, reason=reason,
                  extra={name: [m.get(name) for m in history] for name in DRIFT_SERIES})
