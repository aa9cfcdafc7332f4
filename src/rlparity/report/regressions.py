"""Regressions in a history: benchmarks slower than their own noise allows, and verdicts that went pass -> fail.

The benchmark statistic. Each benchmark run times its call over several rounds; the spread of those rounds is
the noise that run measured. For a benchmark's latest run and the previous run on the same environment (the
same device and versions), with medians m_prev, m_new and round spreads s_prev, s_new:

    slowdown flagged  when  m_new - m_prev > NOISE_SIGMAS * sqrt(s_prev**2 + s_new**2)

s is a standard deviation of one round, estimated robustly: IQR / 1.349 where pytest-benchmark kept the IQR,
else its standard deviation, else (the JSON-lines benchmark logs keep min, median, max) the range divided by
the expected range of that many normal samples (d2, e.g. 3.08 for 10 rounds). It is the spread of one round,
not the standard error of the median (s / sqrt(n)): rounds of one run share that run's clocks, temperature and
allocator state, so the standard error understates how far two runs' medians wander apart, and a test built on
it would flag ordinary run-to-run drift. NOISE_SIGMAS = 3: two medians of the same code differ by more than
three combined round spreads in fewer than 0.3 % of comparisons if rounds were normal; a real slowdown of a few
percent clears it (GPU kernels' rounds scatter by 0.1-1 %). A run with fewer than MIN_ROUNDS rounds measured no
noise and is never flagged (shown as "noise not measured"). Faster runs are listed but are not regressions.

Verdicts. A cell (property, subject, case, dtype, shapes) is a regression when its latest verdict on an
environment is fail or error and the run before it on the same environment passed, or when, on one device,
it passes under an older engine version and fails under a newer one.
"""

import functools
import json
import math
import shlex
from collections import defaultdict
from dataclasses import dataclass

NOISE_SIGMAS = 3.0
MIN_ROUNDS = 2
IQR_TO_SIGMA = 1.349  # the interquartile range of a normal distribution, in standard deviations
FAILING = ("fail", "error")
SUITE_PARTS = {"sink_attention": "attention", "sequence_parallel": "sequence-parallel", "logprob_parity": "parity",
               "routing": "routing", "memory": "memory", "trainer": "trainer"}


@functools.cache
def expected_range(n: int) -> float:
    """d2(n): the expected range of n standard normal samples, by integrating 1 - F^n - (1 - F)^n."""
    def normal_cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    step = 0.01
    return sum(1 - normal_cdf(x) ** n - (1 - normal_cdf(x)) ** n for x in (i * step for i in range(-800, 800))) * step


def round_spread(row: dict) -> float | None:
    """One round's standard deviation, as the module docstring says; None when the run measured no noise."""
    rounds = row.get("rounds") or 0
    if rounds < MIN_ROUNDS:
        return None
    if row.get("iqr_s") is not None and rounds >= 4:
        return row["iqr_s"] / IQR_TO_SIGMA
    if row.get("stddev_s") is not None:
        return row["stddev_s"]
    if row.get("min_s") is not None and row.get("max_s") is not None:
        return (row["max_s"] - row["min_s"]) / expected_range(int(rounds))
    return None


@dataclass
class BenchmarkChange:
    name: str
    environment: str
    previous: dict
    latest: dict
    change: float  # relative change of the median, + is slower
    noise: float | None  # NOISE_SIGMAS * combined spread, in seconds; None when not measured
    regression: bool


def benchmark_changes(rows: list[dict]) -> list[BenchmarkChange]:
    """For each benchmark and environment with two runs or more: its latest run against the one before."""
    series = defaultdict(list)
    for row in rows:  # oldest first
        if row.get("median_s"):
            series[(row["name"], row["environment"])].append(row)
    changes = []
    for (name, environment), runs in series.items():
        by_run = {}
        for row in runs:
            by_run[row["run_id"]] = row  # one point per run: the latest line of a run
        if len(by_run) < 2:
            continue
        previous, latest = list(by_run.values())[-2:]
        spreads = [round_spread(previous), round_spread(latest)]
        noise = None if None in spreads else NOISE_SIGMAS * math.hypot(*spreads)
        delta = latest["median_s"] - previous["median_s"]
        changes.append(BenchmarkChange(name, environment, previous, latest, delta / previous["median_s"], noise,
                                       noise is not None and delta > noise))
    return sorted(changes, key=lambda c: (not c.regression, -c.change))


def cell_key(row: dict) -> tuple:
    return row["property"], row["subject"], row.get("case"), row.get("dtype"), row.get("shapes")


def reproduce_command(row: dict) -> str:
    """The command that re-runs a cell's check, narrowed to its case."""
    part = SUITE_PARTS.get(row["property"].split(".")[0])
    if part is None:
        return f"rlparity conformance -k {shlex.quote(row.get('case') or row['property'])}"
    command = ["rlparity", "conformance", "--only", part]
    if part == "attention" and all(c.isalnum() or c in "_-:." for c in row["subject"]):
        command += ["--attention-backend", row["subject"]]
    versions = json.loads(row.get("engine_versions") or "{}")
    pins = " ".join(f"{name}=={version}" for name, version in sorted(versions.items()))
    case = (row.get("case") or "").split(":")[0]
    text = shlex.join(command + (["-k", case] if case else []))
    return f"{text}  # with {pins}" if pins else text


@dataclass
class VerdictChange:
    cell: tuple
    where: str  # the environment, or the device for a change between engine versions
    before: dict
    after: dict
    between_versions: bool

    @property
    def regression(self) -> bool:
        return self.before["verdict"] == "pass" and self.after["verdict"] in FAILING


def _version_key(text: str):
    from packaging.version import InvalidVersion, Version

    parts = []
    for name_version in text.split(", "):
        name, _, version = name_version.partition(" ")
        try:
            parts.append((name, Version(version)))
        except InvalidVersion:
            parts.append((name, Version("0")))
    return parts


def engine_version_text(row: dict) -> str:
    versions = json.loads(row.get("engine_versions") or "{}")
    return ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))


def verdict_changes_over_time(rows: list[dict]) -> list[VerdictChange]:
    series = defaultdict(dict)  # (cell, environment) -> run -> latest row of that run
    for row in rows:
        if row["verdict"] in ("pass", *FAILING):
            series[(cell_key(row), row["environment"])][row["run_id"]] = row
    changes = []
    for (cell, environment), by_run in series.items():
        if len(by_run) >= 2:
            before, after = list(by_run.values())[-2:]
            if before["verdict"] != after["verdict"]:
                changes.append(VerdictChange(cell, environment, before, after, between_versions=False))
    return changes


def verdict_changes_between_versions(rows: list[dict]) -> list[VerdictChange]:
    """Cells whose verdict differs between two engine versions on one device (consecutive versions)."""
    series = defaultdict(dict)  # (cell, device) -> engine versions -> latest row
    for row in rows:
        versions = engine_version_text(row)
        if versions and row["verdict"] in ("pass", *FAILING):
            series[(cell_key(row), row["environment"].split(" · ", 1)[0])][versions] = row
    changes = []
    for (cell, device), by_version in series.items():
        ordered = sorted(by_version, key=_version_key)
        for older, newer in zip(ordered, ordered[1:]):
            if by_version[older]["verdict"] != by_version[newer]["verdict"]:
                changes.append(VerdictChange(cell, device, by_version[older], by_version[newer],
                                             between_versions=True))
    return changes
