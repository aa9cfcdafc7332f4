"""The charts' data: Plotly traces (plain dicts) for engine-version statistics and benchmarks over time."""

import json
import time
from collections import defaultdict

from rlparity.report.regressions import engine_version_text

# Parity statistics from a logprob_parity record's extra["metrics"] (rlparity.metrics), and how to draw them.
PARITY_STATISTICS = {"dlogp_max": ("max |Δlogp|", "log"), "dlogp_mean": ("mean |Δlogp|", "log"),
                     "kl_k3": ("k3 KL", "log")}
RATIO_OUTSIDE = "ratio_outside_"  # metrics["ratio_outside_<ε>"]: the fraction of tokens with ratio outside 1±ε
# routing.* records compare two routings; differ_any_layer is the fraction of tokens routed to another expert set
# in at least one layer: the routing flip rate.
FLIP_RATE = ("routing flip rate (tokens routed differently in any layer)", "linear")

BENCHMARK_METRICS = {"median_ms": "time (ms, median of rounds)", "tflops": "TFLOP/s", "pct_of_peak":
                     "% of the measured bf16 matmul peak", "memory_gib": "memory above inputs (GiB)"}


def engine_statistics(records: list[dict]) -> dict[str, tuple[str, str, dict]]:
    """statistic -> (title, axis type, {(subject, device): {engine versions: value}}), the latest per point."""
    found = defaultdict(lambda: defaultdict(dict))
    titles = {}
    for row in records:
        versions = engine_version_text(row)
        if not versions:
            continue
        extra = json.loads(row["payload"]).get("extra", {})
        series = (row["subject"], row["environment"].split(" · ", 1)[0])
        if row["property"] == "logprob_parity" and isinstance(extra.get("metrics"), dict):
            for key, value in extra["metrics"].items():
                if key in PARITY_STATISTICS:
                    titles[key] = PARITY_STATISTICS[key]
                elif key.startswith(RATIO_OUTSIDE):
                    titles[key] = (f"importance ratio outside 1±{key.removeprefix(RATIO_OUTSIDE)}", "linear")
                else:
                    continue
                if isinstance(value, (int, float)):
                    found[key][series][versions] = value
        elif row["property"].startswith("routing.") and isinstance(extra.get("comparison"), dict):
            value = extra["comparison"].get("differ_any_layer")
            if isinstance(value, (int, float)):
                titles["flip_rate"] = FLIP_RATE
                found["flip_rate"][series][versions] = value
    order = [*PARITY_STATISTICS, *sorted(k for k in titles if k.startswith(RATIO_OUTSIDE)), "flip_rate"]
    return {key: (*titles[key], {s: dict(v) for s, v in found[key].items()}) for key in order if key in titles}


def engine_traces(points: dict, axis: str) -> list[dict]:
    traces = []
    for (subject, device), by_version in sorted(points.items()):
        xs = sorted(by_version)
        ys = [by_version[x] for x in xs]
        if axis == "log":  # a log axis cannot show 0; those points are counted in the chart's note
            xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ((), ())
        traces.append({"type": "scatter", "mode": "lines+markers", "name": f"{subject} · {device}",
                       "x": list(xs), "y": list(ys)})
    return traces


def run_label(row: dict) -> str:
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["time"]))
    return f"{date} · {(row.get('commit') or 'unknown')[:8]} · {row['run_id'].split('/')[0]}"


def benchmark_value(row: dict, metric: str):
    if metric == "median_ms":
        return None if row["median_s"] is None else row["median_s"] * 1e3
    if metric == "memory_gib":
        return None if row["memory_bytes"] is None else row["memory_bytes"] / 2**30
    return row[metric]


def benchmark_traces(rows: list[dict], metric: str, shown_shape: str | None = None) -> list[dict]:
    """One trace per backend, shape and device (its shape in `meta`, for the page's shape filter); one point per
    run, in run order. Only the traces of `shown_shape` are visible at first, when it is given."""
    series = defaultdict(dict)
    for row in rows:
        value = benchmark_value(row, metric)
        if value is not None:
            device = row["environment"].split(" · ", 1)[0]
            series[(row["shape"], row["backend"] or row["name"], device)][run_label(row)] = value
    return [{"type": "scatter", "mode": "lines+markers", "name": f"{backend} · {device}", "meta": shape,
             "visible": shown_shape in (None, shape), "x": list(points), "y": list(points.values())}
            for (shape, backend, device), points in sorted(series.items())]


def busiest_shape(rows: list[dict]) -> str | None:
    """The shape with the most points (backends × runs): what the benchmark charts show first."""
    points = defaultdict(set)
    for row in rows:
        points[row["shape"]].add((row["backend"], row["run_id"]))
    return max(sorted(points), key=lambda shape: len(points[shape])) if points else None
