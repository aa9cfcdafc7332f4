"""Runs compared record by record (rlparity.repetition) and `rlparity conformance --repeat`."""

import copy
import json
import os
import subprocess
import sys

import pytest

from rlparity.repetition import NOT_MEASUREMENTS, compare_runs, report
from rlparity.results import read_records
from rlparity.suite import run_results_paths, split_option

# One small real selection of the suite: the float32 window cases of the reference backend (about 5 s a run here).
REAL_SUBSET = ("--only", "attention", "-k", "window and fp32 and reference")
SUBSET_TIMEOUT_S = 300  # two runs of REAL_SUBSET took 19 s on this 2-core machine; a wide margin for a loaded CI


def record(property="sink_attention.out", subject="triton", case="window_edge", dtype="fp32", verdict="pass",
           error=1e-7, **extra):
    return {"property": property, "subject": subject, "case": case, "dtype": dtype, "verdict": verdict,
            "error": error, "tolerance": 1e-5, "reason": "", "shapes": {}, "extra": extra, "time": 1.0,
            "environment": {}}


def run_of(*records):
    return [copy.deepcopy(row) for row in records]


BASE = (record(), record(case="packed", extra_metric=0.5), record(property="logprob_parity", subject="hf vs vllm",
        case="prompts", metrics={"kl_k1": 1e-6, "dlogp": [0.1, 0.2]}, seconds=3.0))


def test_identical_runs_have_no_difference():
    runs = [run_of(*BASE) for _ in range(3)]
    runs[2][0]["time"] = 99.0  # when a record was written is not a measurement
    assert compare_runs(runs) == []


def test_a_verdict_flip_names_the_check_and_the_run():
    runs = [run_of(*BASE) for _ in range(3)]
    runs[2][1]["verdict"] = "fail"
    (difference,) = compare_runs(runs)
    assert (difference.check, difference.run, difference.what) == ("sink_attention.out | triton | packed | fp32", 3,
                                                                   "verdict")
    assert difference.describe() == "sink_attention.out | triton | packed | fp32: verdict 'pass' in run 1, 'fail' in " \
                                    "run 3"


@pytest.mark.parametrize("change, path", [
    (lambda run: run[0].update(error=2e-7), "error"),
    (lambda run: run[1]["extra"].update(extra_metric=0.25), "extra.extra_metric"),
    (lambda run: run[2]["extra"]["metrics"]["dlogp"].__setitem__(1, 0.3), "extra.metrics.dlogp[1]"),
    (lambda run: run[2]["extra"]["metrics"].update(kl_k1=None), "extra.metrics.kl_k1"),
    (lambda run: run[2]["extra"]["metrics"].update(new=1), "extra.metrics.new"),
])
def test_a_number_change_is_reported_with_its_path(change, path):
    runs = [run_of(*BASE), run_of(*BASE)]
    change(runs[1])
    assert [difference.what for difference in compare_runs(runs)] == [path]


def test_wall_times_are_not_compared_and_other_numbers_are():
    runs = [run_of(*BASE), run_of(*BASE)]
    runs[1][2]["extra"]["seconds"] = 4.0
    assert "seconds" in NOT_MEASUREMENTS
    assert compare_runs(runs) == []
    runs[1][2]["extra"]["metrics"]["kl_k1"] = 2e-6
    assert [difference.what for difference in compare_runs(runs)] == ["extra.metrics.kl_k1"]


def test_nan_equals_nan_but_not_a_number():
    runs = [run_of(record(error=float("nan"))), run_of(record(error=float("nan")))]
    assert compare_runs(runs) == []
    runs[1][0]["error"] = 0.0
    assert [difference.what for difference in compare_runs(runs)] == ["error"]


def test_missing_and_extra_records_are_listed():
    runs = [run_of(*BASE), run_of(*BASE[:2]), run_of(*BASE, record(case="new"))]
    found = {(difference.run, difference.what, difference.check) for difference in compare_runs(runs)}
    assert found == {(2, "missing", "logprob_parity | hf vs vllm | prompts | fp32"),
                     (3, "extra record", "sink_attention.out | triton | new | fp32")}


def test_repeated_keys_are_compared_in_order():
    step = dict(property="trainer.step", subject="grpo", case="step 0", dtype="float32")
    first = run_of(record(**step, loss=1.0), record(**step, loss=2.0))
    assert compare_runs([first, run_of(*first)]) == []
    swapped = run_of(first[1], first[0])
    differences = compare_runs([first, swapped])
    assert [(difference.check, difference.what) for difference in differences] == [
        ("trainer.step | grpo | step 0 | float32", "extra.loss"),
        ("trainer.step | grpo | step 0 | float32 #2", "extra.loss")]
    fewer = compare_runs([first, first[:1]])
    assert [(difference.check, difference.what) for difference in fewer] == [
        ("trainer.step | grpo | step 0 | float32 #2", "missing")]


def test_report_lists_each_difference():
    runs = [run_of(*BASE), run_of(*BASE)]
    runs[1][0]["verdict"] = "error"
    lines = report(["a.jsonl", "b.jsonl"], runs, compare_runs(runs))
    assert lines[0] == "rlparity repetition: 2 runs, records per run [3, 3]"
    assert lines[-3:] == ["1 differences in 1 checks:",
                          "  sink_attention.out | triton | window_edge | fp32: verdict 'pass' in run 1, 'error' in "
                          "run 2",
                          "checks that differ, by property: sink_attention.out 1"]


def test_each_run_gets_its_own_results_file(tmp_path, monkeypatch):
    assert run_results_paths(str(tmp_path / "out.jsonl"), 3) == [tmp_path / f"out-run{i}.jsonl" for i in (1, 2, 3)]
    monkeypatch.setenv("RLPARITY_RESULTS_DIR", str(tmp_path))
    paths = run_results_paths(None, 2)
    assert [path.name for path in paths] == ["run-1.jsonl", "run-2.jsonl"]
    assert paths[0].parent.parent == tmp_path and paths[0].parent.name.startswith("repetition-")
    assert split_option(["-q", "--results=x.jsonl", "-x"], "--results", "f") == ("x.jsonl", ["-q", "-x"])


def rlparity(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rlparity.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=SUBSET_TIMEOUT_S, env=os.environ | {"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("repeat", ["1", "x"])
def test_a_bad_repeat_count_is_a_usage_error(tmp_path, repeat):
    run = rlparity("conformance", "--repeat", repeat, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"rlparity: error: --repeat {repeat!r}: expected a whole number of runs, at "
                                  "least 2")


@pytest.mark.slow
@pytest.mark.timeout(SUBSET_TIMEOUT_S)
def test_repeat_on_a_real_subset_is_identical_and_a_changed_file_is_found(tmp_path):
    results = tmp_path / "subset.jsonl"
    run = rlparity("conformance", "--repeat", "2", *REAL_SUBSET, "-q", "--results", str(results), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "identical: every verdict and every number" in run.stdout
    first, second = (tmp_path / f"subset-run{i}.jsonl" for i in (1, 2))
    rows = [json.loads(line) for line in second.read_text().splitlines()]
    assert len(rows) == len(first.read_text().splitlines()) > 0
    rows[0]["error"] = (rows[0]["error"] or 0.0) + 1.0
    second.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (difference,) = compare_runs([read_records(first), read_records(second)])
    assert difference.what == "error" and difference.check.startswith(rows[0]["property"])
