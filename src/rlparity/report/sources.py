"""What runs leave behind, read as rows: conformance records and benchmark results, each with its source file.

Three kinds of file: JSON-lines result files (rlparity.results, plain or .gz), JSON-lines benchmark logs
(benchmarks/bench_attention.py's RLPARITY_BENCH_LOG: name, median_s, rounds, extra_info) and pytest-benchmark
JSON. A JSON-lines file is told by its first line; a file of another kind (a tuning log kept beside the runs)
is skipped and named. Within a results file or a benchmark log, a line of another kind is an error naming file
and line.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.results import VERDICTS, read_records

RECORDS, BENCHMARKS = "records", "benchmarks"


@dataclass
class Source:
    path: Path
    kind: str  # RECORDS | BENCHMARKS
    rows: list[dict]
    sha256: str
    commit: str | None = None  # where the folder names the commit it ran (gpu_run.sh's summary.txt)
    time: float | None = None  # pytest-benchmark's datetime, or the earliest record time
    skipped: list[str] = field(default_factory=list)


def is_record(row: dict) -> bool:
    return "property" in row and "verdict" in row


def is_whole_record(row: dict) -> bool:
    return (is_record(row) and row["verdict"] in VERDICTS and isinstance(row.get("property"), str)
            and isinstance(row.get("subject"), str))


def is_whole_benchmark_line(row: dict) -> bool:
    return is_benchmark_line(row) and isinstance(row["name"], str) and isinstance(row["extra_info"], dict)


def is_benchmark_line(row: dict) -> bool:
    return "name" in row and "extra_info" in row


def files(paths, patterns=("*.jsonl", "*.jsonl.gz", "*.json")):
    seen = set()
    for path in map(Path, paths):
        found = sorted(f for p in patterns for f in path.rglob(p)) if path.is_dir() else [path] if path.exists() else []
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                yield file


COMMIT_LINE = re.compile(r"^[0-9a-f]{40}$")
DATE_FORMATS = ("%a %b %d %I:%M:%S %p %Z %Y", "%a %b %d %H:%M:%S %Z %Y")  # `date` in an English locale


def folder_summary(folder: Path) -> tuple[str | None, float | None]:
    """(commit, time) of a kept GPU run, from its summary.txt: benchmarks/gpu_run.sh writes `date` on the first
    line and `git rev-parse HEAD` on a line of its own."""
    summary = folder / "summary.txt"
    if not summary.exists():
        return None, None
    lines = [line.strip() for line in summary.read_text(errors="replace").splitlines()]
    commit = next((line for line in lines if COMMIT_LINE.match(line)), None)
    stamp = None
    for form in DATE_FORMATS:
        try:
            stamp = datetime.strptime(lines[0], form).replace(tzinfo=timezone.utc).timestamp() if lines else None
            break
        except ValueError:
            continue
    return commit, stamp


def _pytest_benchmark_rows(path: Path, data: dict) -> list[dict]:
    machine = data.get("machine_info", {})
    rows = []
    for bench in data.get("benchmarks", []):
        stats = bench.get("stats", {})
        extra = dict(bench.get("extra_info", {}))
        extra.setdefault("environment", {"device": machine.get("cpu", {}).get("brand_raw", "?")})
        rows.append({"name": bench.get("name") or bench.get("fullname", "?"), "median_s": stats.get("median"),
                     "min_s": stats.get("min"), "max_s": stats.get("max"), "stddev_s": stats.get("stddev"),
                     "iqr_s": stats.get("iqr"), "rounds": stats.get("rounds"), "extra_info": extra})
    return rows


def read_source(path: Path) -> Source | None:
    """The rows of one file, or None for a JSON-lines file that is neither results nor a benchmark log."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    commit, folder_time = folder_summary(path.parent)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RlparityError(f"{path}:{exc.lineno}: expected pytest-benchmark JSON ({exc.msg})") from None
        if not isinstance(data, dict) or "benchmarks" not in data:
            return None  # another JSON file kept beside the runs (a tuned configuration)
        stamp = data.get("datetime")
        time = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else folder_time
        return Source(path, BENCHMARKS, _pytest_benchmark_rows(path, data), digest, commit, time)
    rows = read_records(path)
    if not rows:
        return Source(path, RECORDS, [], digest, commit, folder_time)
    kind = RECORDS if is_record(rows[0]) else BENCHMARKS if is_benchmark_line(rows[0]) else None
    if kind is None:
        return None
    belongs = is_whole_record if kind == RECORDS else is_whole_benchmark_line
    for number, row in enumerate(rows, 1):
        if not belongs(row):
            what = ("a result record (property, subject, verdict in pass|fail|skip|error)" if kind == RECORDS
                    else "a benchmark line (name, extra_info)")
            raise RlparityError(f"{path}:{number}: expected {what} like the first line, got "
                                f"{json.dumps(row)[:80]}")
    times = [row["time"] for row in rows if isinstance(row.get("time"), (int, float))]
    return Source(path, kind, rows, digest, commit, min(times) if times else folder_time)


def read_sources(paths) -> tuple[list[Source], list[Path]]:
    """(the sources under `paths`, the JSON files skipped as neither results nor benchmarks)."""
    sources, skipped = [], []
    for path in files(paths):
        source = read_source(path)
        (sources.append(source) if source else skipped.append(path))
    return sources, skipped

