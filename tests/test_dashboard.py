"""The dashboard groups verdicts by environment, lists failing cells and benchmark numbers, escaped."""

import gzip
import json

from rlparity.report import build_dashboard
from rlparity.results import Record, ResultStore


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
    assert "test_fwd[triton-8k]" in page and "2.100" in page and "412.5" in page


def test_dashboard_without_inputs_says_so(tmp_path):
    page = build_dashboard([tmp_path / "none"], [], tmp_path / "index.html").read_text()
    assert "No conformance records found" in page and "No benchmark files found" in page


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

    page = build_dashboard([runs], [], tmp_path / "index.html").read_text()

    assert '<span class="pass">1 pass</span>' in page  # the H100 cell, fixed by the later run
    assert page.count('<span class="fail">1 fail</span>') == 1  # the cpu cell, never re-run


def test_benchmark_logs_are_read_beside_pytest_benchmark_json_and_listed_once(tmp_path):
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

    page = build_dashboard([run], [run], tmp_path / "index.html").read_text()

    assert "No conformance records found" in page  # benchmark lines are not result records
    assert page.count("test_attention[triton-seq8k-causal-fwd]") == 1
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
