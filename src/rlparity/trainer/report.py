"""Plots of a training run from its results file over steps: reward, KL, entropy, first-mini-batch ratio, and the
train-rollout mismatch in slime's and verl's names (rlparity.mismatch_metrics).

PNG through matplotlib when it is installed (`pip install matplotlib`), else the static HTML dashboard
(rlparity.report.dashboard) of the same records.
"""

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from rlparity.results import read_records
from rlparity.trainer.trainer import EVAL_PROPERTY, STEP_PROPERTY

PANELS = (("reward", "reward (batch mean; stars: held-out before / after)"), ("kl_k3", "KL to reference (k3)"),
          ("entropy", "entropy"),
          ("ratio_mean", "first mini-batch ratio (min / mean / max)"), ("clip_fraction", "clip fraction"),
          ("train_rollout_dlogp_mean", "train-rollout |Δlogp| mean"),
          ("train/train_rollout_logprob_abs_diff", "slime train_rollout_logprob_abs_diff (drift)"),
          ("rollout_corr/k3_kl", "verl rollout_corr/k3_kl"))


def step_series(paths: Sequence[Path]) -> dict[str, list[dict]]:
    """subject -> its step metrics in step order, from one or more results files."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        for record in read_records(path):
            if record["property"] == STEP_PROPERTY and record["verdict"] == "pass":
                runs.setdefault(f"{record['subject']} ({Path(path).stem})", []).append(record["extra"])
    return {subject: sorted(rows, key=lambda row: row["step"]) for subject, rows in runs.items()}


def held_out_rewards(paths: Sequence[Path]) -> dict[str, dict[str, float]]:
    """subject -> {"before": reward, "after": reward} on the held-out tasks."""
    found: dict[str, dict[str, float]] = {}
    for path in paths:
        for record in read_records(path):
            if record["property"] == EVAL_PROPERTY:
                found.setdefault(f"{record['subject']} ({Path(path).stem})", {})[record["case"]] = record["error"]
    return found


def write_report(paths: Sequence[Path | str], out: Path | str) -> Path:
    """Writes out.png (matplotlib) or out.html (dashboard) and returns the path written."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    if importlib.util.find_spec("matplotlib") is None:
        from rlparity.report.dashboard import build_dashboard

        target = out.with_suffix(".html")
        build_dashboard(paths, [], target)
        return target
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = step_series(paths)
    held_out = held_out_rewards(paths)
    figure, axes = plt.subplots(2, 4, figsize=(20, 8))
    for axis, (key, title) in zip(axes.flat, PANELS):
        for subject, rows in runs.items():
            steps = [row["step"] for row in rows]
            # runs recorded before a metric existed have no value for it
            line, = axis.plot(steps, [row.get(key, math.nan) for row in rows], marker=".", label=subject)
            if key == "ratio_mean":
                axis.fill_between(steps, [row["ratio_min"] for row in rows], [row["ratio_max"] for row in rows],
                                  color=line.get_color(), alpha=0.2)
            if key == "reward" and subject in held_out:
                ends = {"before": steps[0], "after": steps[-1]} if steps else {}
                for case, reward in held_out[subject].items():
                    axis.plot([ends.get(case, 0)], [reward], marker="*", markersize=14, color=line.get_color(),
                              linestyle="none", label=f"held-out {case}: {reward:.3f}")
        axis.set_title(title)
        axis.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    target = out.with_suffix(".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
