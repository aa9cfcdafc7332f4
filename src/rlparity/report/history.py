"""The history store: every run's records and benchmark results, tagged, in append-only Parquet files.

One folder, no server. Each ingest writes new Parquet files (records-<stamp>-<id>.parquet,
benchmarks-<stamp>-<id>.parquet) through DuckDB and never rewrites one, so concurrent runs cannot clobber
each other, a killed ingest leaves no partial file (written beside, then renamed), and the folder can be kept
between CI runs as plain files (the nightly keeps it on the gh-pages branch beside the page). A source file
already ingested (same SHA-256) is not ingested twice.

Every row carries SCHEMA_VERSION. Later versions only add columns, and read with union_by_name, so a row
written by an older rlparity reads with NULL in the columns it did not have. The original record or
benchmark line is kept whole in `payload`, so anything not broken out into a column can still be derived.

DuckDB (a 25 MB wheel, 69 MB installed, no dependencies; 1.3 s to install here) was chosen over pyarrow
(55 MB wheel, 170 MB installed, 3.4 s) for the same Parquet files.
"""

import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.report.frameworks import record_framework_metrics, record_step
from rlparity.report.labels import engine_versions, environment_label
from rlparity.report.sources import BENCHMARKS, RECORDS, Source

# 2: records gained framework_metrics (verl's, slime's and NeMo-RL's mismatch metrics by their own names, as JSON)
# and step (a trainer step's index); rows of version 1 derive both from their payload (rlparity.report.frameworks).
SCHEMA_VERSION = 2

TAGS = {"schema_version": "INTEGER", "run_id": "VARCHAR", "commit": "VARCHAR", "ingested_at": "DOUBLE",
        "time": "DOUBLE", "sequence": "BIGINT", "source": "VARCHAR", "source_sha256": "VARCHAR",
        "environment": "VARCHAR", "environment_json": "VARCHAR", "engine_versions": "VARCHAR", "payload": "VARCHAR"}
COLUMNS = {
    RECORDS: TAGS | {"property": "VARCHAR", "subject": "VARCHAR", "case": "VARCHAR", "dtype": "VARCHAR",
                     "verdict": "VARCHAR", "error": "DOUBLE", "tolerance": "DOUBLE", "reason": "VARCHAR",
                     "shapes": "VARCHAR", "framework_metrics": "VARCHAR", "step": "BIGINT"},
    BENCHMARKS: TAGS | {"name": "VARCHAR", "backend": "VARCHAR", "shape": "VARCHAR", "median_s": "DOUBLE",
                        "min_s": "DOUBLE", "max_s": "DOUBLE", "stddev_s": "DOUBLE", "iqr_s": "DOUBLE",
                        "rounds": "BIGINT", "tflops": "DOUBLE", "pct_of_peak": "DOUBLE", "memory_bytes": "DOUBLE"},
}


def duckdb():
    try:
        import duckdb as module
    except ImportError:
        raise RlparityError("the dashboard's history store needs duckdb: pip install 'rlparity[dashboard]'") from None
    return module


def current_commit() -> str:
    """$RLPARITY_COMMIT, $GITHUB_SHA, or this checkout's HEAD; "unknown" outside a git checkout."""
    for name in ("RLPARITY_COMMIT", "GITHUB_SHA"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def benchmark_shape(extra: dict) -> str:
    """What a benchmark ran on, readably: "seq 8192 · window 128 · fwd_bwd" (or the matmul size)."""
    if extra.get("kind") == "matmul_peak":
        return f"{extra.get('size')}² {extra.get('dtype', '')}".strip()
    parts = [f"seq {extra['seq']}" if "seq" in extra else None,
             f"window {extra['window']}" if extra.get("window") else "full" if "seq" in extra else None,
             extra.get("mode")]
    return " · ".join(str(p) for p in parts if p) or "-"


def _tags(source: Source, row: dict, run_id: str, commit: str, now: float, sequence: int) -> dict:
    environment = row.get("environment") or row.get("extra_info", {}).get("environment") or {}
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id, "commit": source.commit or commit,
            "ingested_at": now, "time": _number(row.get("time")) or source.time or now, "sequence": sequence,
            "source": f"{source.path.parent.name}/{source.path.name}", "source_sha256": source.sha256,
            "environment": environment_label(environment), "environment_json": json.dumps(environment),
            "engine_versions": json.dumps(engine_versions(environment)), "payload": json.dumps(row)}


def record_row(source, row, **tags) -> dict:
    return _tags(source, row, **tags) | {
        "property": row["property"], "subject": row["subject"], "case": row.get("case"), "dtype": row.get("dtype"),
        "verdict": row["verdict"], "error": _number(row.get("error")), "tolerance": _number(row.get("tolerance")),
        "reason": row.get("reason", ""), "shapes": json.dumps(row.get("shapes"), sort_keys=True),
        "framework_metrics": json.dumps(metrics) if (metrics := record_framework_metrics(row)) else None,
        "step": record_step(row)}


def benchmark_row(source, row, **tags) -> dict:
    extra = row["extra_info"]
    return _tags(source, row, **tags) | {
        "name": row["name"].rsplit("::", 1)[-1], "backend": extra.get("backend") or extra.get("kind"),
        "shape": benchmark_shape(extra), "median_s": _number(row.get("median_s")), "min_s": _number(row.get("min_s")),
        "max_s": _number(row.get("max_s")), "stddev_s": _number(row.get("stddev_s")),
        "iqr_s": _number(row.get("iqr_s")), "rounds": _number(row.get("rounds")),
        "tflops": _number(extra.get("tflops", extra.get("tflops_median"))),
        "pct_of_peak": _number(extra.get("pct_of_matmul_peak")),
        # bench_attention.py measures the peak beyond what existed before the call, i.e. above its inputs
        "memory_bytes": _number(extra.get("peak_memory_bytes"))}


def _measurement(row: dict) -> tuple:
    return row["name"], row["environment"], row["median_s"], row["min_s"], row["max_s"], row["rounds"]


def _stem(name: str) -> str:
    for suffix in (".jsonl.gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


class HistoryStore:
    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    def _glob(self, kind: str) -> str:
        return str(self.folder / f"{kind}-*.parquet")

    def _has(self, kind: str) -> bool:
        return any(self.folder.glob(f"{kind}-*.parquet"))

    def _read(self, kind: str):
        return duckdb().sql(f"SELECT * FROM read_parquet('{self._glob(kind)}', union_by_name=true)")

    def ingested(self) -> set[str]:
        """The SHA-256 of every source file in the history (files written before that column have none)."""
        done = set()
        for kind in (RECORDS, BENCHMARKS):
            if self._has(kind) and "source_sha256" in (relation := self._read(kind)).columns:
                done |= {sha for (sha,) in relation.select("source_sha256").distinct().fetchall() if sha}
        return done

    def run_ids(self) -> set[str]:
        return {run for kind in (RECORDS, BENCHMARKS) if self._has(kind)
                for (run,) in self._read(kind).select("run_id").distinct().fetchall()}

    def ingest(self, sources: list[Source], run_id: str | None = None, commit: str | None = None) -> int:
        """Append the sources not ingested before; returns how many rows were added. Each file is a run of its own
        (named folder/file, stamped when that name is in the history already) unless `run_id` names the run."""
        done, now, commit = self.ingested(), time.time(), commit or current_commit()
        # A benchmark cell found twice (pytest-benchmark JSON and the JSON-lines log of the same run) is kept once.
        measured = {_measurement(row) for row in self.rows(BENCHMARKS)}
        known_runs = self.run_ids()
        rows = {RECORDS: [], BENCHMARKS: []}
        for source in sources:
            if source.sha256 in done:
                continue
            done.add(source.sha256)
            make = record_row if source.kind == RECORDS else benchmark_row
            run = run_id or f"{source.path.parent.name}/{_stem(source.path.name)}"
            if not run_id and run in known_runs:  # a file rewritten in place (results/engine-matrix/<version>.jsonl)
                run = f"{run}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}"
            for row in source.rows:
                new = make(source, row, run_id=run, commit=commit, now=now, sequence=sum(map(len, rows.values())))
                if source.kind == BENCHMARKS:
                    if _measurement(new) in measured:
                        continue
                    measured.add(_measurement(new))
                rows[source.kind].append(new)
        for kind, kind_rows in rows.items():
            if kind_rows:
                self._write(kind, kind_rows, now)
        return sum(map(len, rows.values()))

    def _write(self, kind: str, rows: list[dict], now: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        final = self.folder / f"{kind}-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        partial = final.with_suffix(".parquet.partial")
        columns = COLUMNS[kind]
        with tempfile.TemporaryDirectory() as scratch:
            lines = Path(scratch) / "rows.jsonl"
            lines.write_text("".join(json.dumps({c: row.get(c) for c in columns}) + "\n" for row in rows))
            spec = "{" + ", ".join(f"'{c}': '{t}'" for c, t in columns.items()) + "}"
            duckdb().sql(f"COPY (SELECT * FROM read_json('{lines}', format='newline_delimited', columns={spec})) "
                         f"TO '{partial}' (FORMAT parquet)")
        os.replace(partial, final)

    def rows(self, kind: str) -> list[dict]:
        """Every row of `kind`, oldest first (by run time, then the order of ingest)."""
        if not self._has(kind):
            return []
        relation = self._read(kind)
        names = relation.columns
        rows = [dict.fromkeys(COLUMNS[kind]) | dict(zip(names, values)) for values in relation.fetchall()]
        return sorted(rows, key=lambda row: (row["time"] or 0, row["ingested_at"] or 0, row["sequence"] or 0))
