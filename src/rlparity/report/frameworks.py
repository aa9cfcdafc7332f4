"""The train-rollout mismatch in the names verl, slime and NeMo-RL log it under (rlparity.mismatch_metrics), as the
dashboard reads and draws it.

Two kinds of record carry the metrics: a parity record keeps them in extra["frameworks"] (the pair's two sides), a
trainer's per-step record (trainer.step) among its own extra (its first training pass against the rollout). Two views
draw them: per engine pair across runs, each run named with the engine versions it ran (the engine matrix runs one
version per run); and per trainer run over its steps, where a rollout engine that samples with older weights than it
was sent shows as a line rising from the first step's level (rlparity.trainer.drift).
"""

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from rlparity.report.charts import run_label
from rlparity.report.regressions import engine_version_text

STEP_PROPERTY = "trainer.step"  # rlparity.trainer.trainer.STEP_PROPERTY, named here without importing the trainer
# The keys of rlparity.mismatch_metrics.framework_metrics, by the framework's prefix or whole name.
FRAMEWORK_NAMES = ("rollout_corr/", "training/rollout_", "train/train_rollout_logprob_abs_diff",
                   "train/token_mult_prob_error")


@dataclass(frozen=True)
class Metric:
    name: str  # the key in the records (rlparity.mismatch_metrics)
    framework: str
    meaning: str  # a few words: the chart's subtitle is about 45 characters wide
    axis: str  # "log" for magnitudes that are >= 0 by construction; "linear" for signed values and ratios near 1
    logged_as: str = ""  # the name on the framework's own dashboard, where the key adds to it

    @property
    def title(self) -> str:
        return self.logged_as or self.name


# What the page charts, grouped by framework; the other metrics stay in the history (column framework_metrics).
# verl logs the importance-weight statistics as rollout_corr/rollout_is_* for the one level it is configured with.
IS_ESS = "rollout_corr/rollout_is_eff_sample_size"
CHARTED = (  # verl's off-policy diagnostics first, then the other frameworks' headline numbers
    Metric("rollout_corr/k3_kl", "verl", "KL(π_rollout ‖ π_training), k3", "log"),
    Metric("rollout_corr/chi2_token", "verl", "E[ρ²] − 1 over tokens", "linear"),
    Metric("rollout_corr/ppl_ratio", "verl", "training / rollout perplexity", "linear"),
    Metric("rollout_corr/sequence/rollout_is_eff_sample_size", "verl", "sequence level (verl's default)", "linear",
           IS_ESS),
    Metric("training/rollout_probs_diff_max", "verl", "max |p_training − p_rollout|", "log"),
    Metric("training/rollout_probs_diff_mean", "verl", "mean |p_training − p_rollout|", "log"),
    Metric("train/train_rollout_logprob_abs_diff", "slime", "mean over samples of mean |Δlogp|", "log"),
    Metric("train/token_mult_prob_error", "NeMo-RL", "mean exp|Δlogp|; 1 when equal", "linear"),
)
MORE = (  # charted folded away, under the headline charts
    Metric("rollout_corr/kl", "verl", "direct estimator; can be < 0", "linear"),
    Metric("rollout_corr/log_ppl_abs_diff", "verl", "mean |Δ log perplexity|", "log"),
    Metric("rollout_corr/chi2_seq", "verl", "E[ρ_seq²] − 1 over sequences", "linear"),
    Metric("rollout_corr/token/rollout_is_eff_sample_size", "verl", "token level", "linear", IS_ESS),
    Metric("training/rollout_actor_probs_pearson_corr", "verl", "of the token probabilities", "linear"),
)
# Plotly's default colours; a series keeps its colour in every chart of a view, so one legend serves them all.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
DASHES = ("solid", "dash", "dot")


def is_framework_metric(name: str) -> bool:
    return name.startswith(FRAMEWORK_NAMES)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_framework_metrics(record: dict) -> dict[str, float]:
    """{framework metric name: value} of one record (a parity record's extra["frameworks"], else the metrics among
    its extra); finite numbers only (verl's probs_diff_std of one token is NaN)."""
    extra = record.get("extra") or {}
    found = extra.get("frameworks") if isinstance(extra.get("frameworks"), dict) else extra
    return {name: value for name, value in found.items() if is_framework_metric(name) and _finite(value)}


def record_step(record: dict) -> int | None:
    step = (record.get("extra") or {}).get("step")
    return step if record.get("property") == STEP_PROPERTY and isinstance(step, int) else None


def row_framework_metrics(row: dict) -> dict[str, float]:
    """A history row's metrics: its column, or for a row written before the column existed, its payload."""
    if (row.get("schema_version") or 0) >= 2:
        return json.loads(row["framework_metrics"]) if row.get("framework_metrics") else {}
    return record_framework_metrics(json.loads(row["payload"])) if row.get("payload") else {}


def row_step(row: dict) -> int | None:
    if (row.get("schema_version") or 0) >= 2:
        return row.get("step")
    return record_step(json.loads(row["payload"])) if row.get("payload") else None


@dataclass
class View:
    """One way of drawing the metrics: series (legend order, which fixes their colours), the x values in order with
    their tick labels and hover text, and metric name -> series -> {x: value}."""
    name: str
    series: list[str] = field(default_factory=list)
    x_order: list = field(default_factory=list)
    points: dict[str, dict[str, dict]] = field(default_factory=dict)
    x_labels: dict = field(default_factory=dict)
    hover: dict = field(default_factory=dict)

    def add(self, series: str, x, metrics: dict[str, float]) -> None:
        if series not in self.series:
            self.series.append(series)
        if x not in self.x_order:
            self.x_order.append(x)
        for name, value in metrics.items():
            self.points.setdefault(name, {}).setdefault(series, {})[x] = value  # a later row supersedes


def pair_view(records: list[dict]) -> View:
    """Every record but a trainer step's: one series per subject (and check, where it is not logprob_parity) and
    device; one point per run, in run order, named by the engine versions its records name (the run, where they name
    none or another run names the same), and hovered with its date, commit and name."""
    view, versions = View("pairs"), {}
    for row in records:  # oldest first
        metrics = row_framework_metrics(row) if row["property"] != STEP_PROPERTY else {}
        if not metrics:
            continue
        run = row["run_id"]
        versions.setdefault(run, set()).update({engine_version_text(row)} - {""})
        view.hover.setdefault(run, f"{run_label(row)} ({run})")
        check = "" if row["property"] == "logprob_parity" else f" ({row['property']})"
        view.add(f"{row['subject']}{check} · {row['environment'].split(' · ', 1)[0]}", run, metrics)
    labels = {run: ", ".join(sorted(named)) or run for run, named in versions.items()}
    taken = Counter(labels.values())
    view.x_labels = {run: f"{label}<br>{run.split('/')[-1]}" if taken[label] > 1 and label != run else label
                     for run, label in labels.items()}
    view.series.sort()
    return view


def step_view(records: list[dict]) -> View:
    """Passing trainer steps: one series per trainer subject and run, one point per step."""
    view = View("steps")
    for row in records:
        step = row_step(row) if row["property"] == STEP_PROPERTY and row["verdict"] == "pass" else None
        if step is not None and (metrics := row_framework_metrics(row)):
            view.add(f"{row['subject']} · {row['run_id']}", step, metrics)
    view.x_order.sort()
    view.series.sort()
    return view


def traces(view: View, metric: Metric) -> tuple[list[dict], int]:
    """(one trace per series that has the metric, in the view's x order; how many points <= 0 a log axis drops)."""
    found, dropped = [], 0
    for index, series in enumerate(view.series):
        by_x = view.points.get(metric.name, {}).get(series)
        if not by_x:
            continue
        xs = [x for x in view.x_order if x in by_x]
        if metric.axis == "log":
            dropped += sum(1 for x in xs if by_x[x] <= 0)
            xs = [x for x in xs if by_x[x] > 0]
        style = {"color": COLORS[index % len(COLORS)], "dash": DASHES[index // len(COLORS) % len(DASHES)]}
        found.append({"type": "scatter", "mode": "lines+markers", "name": series, "x": xs,
                      "y": [by_x[x] for x in xs], "line": style, "marker": {"color": style["color"]},
                      "showlegend": False} | ({"text": [view.hover[x] for x in xs]} if view.hover else {}))
    return found, dropped


def series_colors(view: View) -> list[tuple[str, str, str]]:
    """(series, colour, dash) in legend order, as traces() draws them."""
    return [(series, COLORS[i % len(COLORS)], DASHES[i // len(COLORS) % len(DASHES)])
            for i, series in enumerate(view.series)]
