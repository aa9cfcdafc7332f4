"""The dashboard groups verdicts by environment, lists failing cells and benchmark numbers, escaped."""

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
