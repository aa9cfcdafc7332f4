"""Runs of the same suite compared record by record: `rlparity conformance --repeat N`.

Each run writes its own results file. Records are keyed by (property, subject, case, dtype) and the how-many-th
time that key appears in its file (a trainer's step records repeat a key when two checks train the same
configuration; the suite runs in a fixed order, so the n-th of a key is the same check in every run).
Between runs the verdicts must be identical, and so must every number a record carries: `error`, `tolerance`
and the numbers anywhere under `extra` (in nested objects and lists), except the fields in NOT_MEASUREMENTS.
Strings (reasons, names) are not compared: what they report is compared as numbers or verdicts.
"""

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Fields of `extra` that are not measurements of the check, so they differ from run to run by design: wall-clock
# times. (The record's own `time` and `environment` are outside the compared fields altogether.)
NOT_MEASUREMENTS = {
    "seconds": "wall time of a check (rlparity.parity, rlparity.trainer.run)",
    "rollout_s": "wall time of a trainer step's rollout (rlparity.trainer.trainer)",
    "step_s": "wall time of a trainer step (rlparity.trainer.trainer)",
}
KEY_FIELDS = ("property", "subject", "case", "dtype")


@dataclass(frozen=True)
class Difference:
    """One way a run differs from the first run, for one check."""

    check: str  # "property | subject | case | dtype", with "#n" for the n-th record of a repeated key
    run: int  # 1-based; always compared against run 1
    what: str  # "verdict", "missing", "extra record", or the number's path ("error", "extra.metrics.kl_k1")
    first: object
    this: object

    def describe(self) -> str:
        if self.what == "missing":
            return f"{self.check}: in run 1, missing from run {self.run}"
        if self.what == "extra record":
            return f"{self.check}: in run {self.run}, not in run 1"
        return f"{self.check}: {self.what} {self.first!r} in run 1, {self.this!r} in run {self.run}"


def check_name(key: tuple, occurrence: int) -> str:
    name = " | ".join(str(part) for part in key)
    return name if occurrence == 1 else f"{name} #{occurrence}"


def keyed(records: list[dict]) -> dict[str, dict]:
    """Records by check name; the n-th record of a repeated key is `... #n`."""
    seen: Counter = Counter()
    by_check = {}
    for record in records:
        key = tuple(record.get(field) for field in KEY_FIELDS)
        seen[key] += 1
        by_check[check_name(key, seen[key])] = record
    return by_check


def numbers(value, path: str) -> dict[str, object]:
    """The numbers (and None, booleans) under `value`, by dotted path; strings and NOT_MEASUREMENTS left out."""
    if isinstance(value, dict):
        found = {}
        for name, item in value.items():
            if name not in NOT_MEASUREMENTS:
                found |= numbers(item, f"{path}.{name}")
        return found
    if isinstance(value, list):
        found = {}
        for index, item in enumerate(value):
            found |= numbers(item, f"{path}[{index}]")
        return found
    if value is None or isinstance(value, (bool, int, float)):
        return {path: value}
    return {}


def measured(record: dict) -> dict[str, object]:
    return {"error": record.get("error"), "tolerance": record.get("tolerance")} | numbers(record.get("extra", {}),
                                                                                         "extra")


def same(a, b) -> bool:
    """Equal, NaN equal to NaN, and a number not equal to a bool or None of the same value."""
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare_records(check: str, run: int, first: dict, this: dict) -> list[Difference]:
    differences = []
    if first.get("verdict") != this.get("verdict"):
        differences.append(Difference(check, run, "verdict", first.get("verdict"), this.get("verdict")))
    a, b = measured(first), measured(this)
    for path in list(a) + [path for path in b if path not in a]:
        if path not in a or path not in b or not same(a[path], b[path]):
            differences.append(Difference(check, run, path, a.get(path, "(absent)"), b.get(path, "(absent)")))
    return differences


def compare_runs(runs: list[list[dict]]) -> list[Difference]:
    """Every difference of runs 2..N from run 1, check by check."""
    first = keyed(runs[0])
    differences = []
    for run, records in enumerate(runs[1:], start=2):
        this = keyed(records)
        for check, record in first.items():
            if check not in this:
                differences.append(Difference(check, run, "missing", None, None))
            else:
                differences.extend(compare_records(check, run, record, this[check]))
        differences.extend(Difference(check, run, "extra record", None, None) for check in this if check not in first)
    return differences


def report(paths: list[Path | str], runs: list[list[dict]], differences: list[Difference]) -> list[str]:
    lines = [f"rlparity repetition: {len(paths)} runs, records per run {[len(records) for records in runs]}"]
    lines += [f"  run {run}: {path}" for run, path in enumerate(paths, start=1)]
    if not differences:
        lines.append(f"identical: every verdict and every number (except {', '.join(NOT_MEASUREMENTS)}, wall times) "
                     "is the same in every run")
        return lines
    checks = {difference.check: difference.check.split(" | ")[0] for difference in differences}
    lines.append(f"{len(differences)} differences in {len(checks)} checks:")
    lines += [f"  {difference.describe()}" for difference in differences]
    by_property = Counter(checks.values())
    lines.append("checks that differ, by property: " + ", ".join(f"{name} {n}" for name, n in by_property.items()))
    return lines
