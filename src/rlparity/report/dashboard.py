"""`rlparity dashboard`: ingest result and benchmark files into the history store, then write the page.

Inputs are what runs leave behind (rlparity.report.sources); the history (rlparity.report.history) keeps every
run, tagged with commit, date, run id, environment and engine versions; the page compares them across
environments, engine versions and time, regressions first (rlparity.report.regressions). Exit status: 0, or 1
when there is a regression (so CI fails on it), 2 for unreadable input, 3 when there was nothing to show.
"""

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from rlparity.report import page
from rlparity.report.charts import engine_statistics
from rlparity.report.frameworks import pair_view, step_view
from rlparity.report.history import HistoryStore
from rlparity.report.regressions import benchmark_changes, verdict_changes_between_versions, verdict_changes_over_time
from rlparity.report.sources import BENCHMARKS, RECORDS, read_sources


@dataclass
class Dashboard:
    path: Path
    regressions: int
    records: int
    benchmarks: int
    added: int
    skipped_files: list[Path]


def default_history(out: Path) -> Path:
    return out.parent / "history"


def build(result_paths, benchmark_paths, out: Path | str, history: Path | str | None = None,
          run_id: str | None = None, commit: str | None = None) -> Dashboard:
    out = Path(out)
    store = HistoryStore(history or default_history(out))
    sources, skipped = read_sources([*result_paths, *benchmark_paths])
    added = store.ingest(sources, run_id=run_id, commit=commit)
    records, benchmarks = store.rows(RECORDS), store.rows(BENCHMARKS)

    changes = benchmark_changes(benchmarks)
    over_time, between_versions = verdict_changes_over_time(records), verdict_changes_between_versions(records)
    verdict_changes = over_time + between_versions
    regressions = sum(c.regression for c in changes) + sum(c.regression for c in verdict_changes)
    runs = len({row["run_id"] for row in records + benchmarks})
    summary = (f"{len(records)} conformance records and {len(benchmarks)} benchmark results from {runs} runs "
               f"(history: {page.esc(store.folder)}). {regressions} regressions.")
    html = page.render(summary, [page.regressions_section(changes, verdict_changes), page.verdicts_section(records),
                                 page.engines_section(engine_statistics(records), between_versions),
                                 page.frameworks_section([pair_view(records), step_view(records)]),
                                 page.benchmarks_section(benchmarks, changes)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html)
    return Dashboard(out, regressions, len(records), len(benchmarks), added, skipped)


def build_dashboard(result_paths, benchmark_paths, out: Path | str, history: Path | str | None = None) -> Path:
    return build(result_paths, benchmark_paths, out, history).path


def run(args) -> int:
    """The command: warnings (torn lines) as one line each on stderr, then a summary; 1 on a regression."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dashboard = build(args.results, args.benchmarks, args.out, args.history, args.run_id, args.commit)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    for path in dashboard.skipped_files:
        print(f"skipped {path}: neither result records nor benchmark results", file=sys.stderr)
    print(f"dashboard written to {dashboard.path}: {dashboard.records} records, {dashboard.benchmarks} benchmark "
          f"results ({dashboard.added} rows added to the history), {dashboard.regressions} regressions")
    if not dashboard.records and not dashboard.benchmarks:
        print(f"nothing was checked for the dashboard: no result records or benchmark results in "
              f"{' '.join(map(str, [*args.results, *args.benchmarks])) or 'no inputs'} nor in the history")
        return 3
    return 1 if dashboard.regressions else 0
