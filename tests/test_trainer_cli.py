"""`rlparity train` (through rlparity.trainer.cli): refusals up front, a short run, metrics and plots written."""

import importlib.util

import pytest

from rlparity.results import read_records
from rlparity.trainer.cli import main
from rlparity.trainer.sft import SftRecipe, sft_checkpoint


@pytest.fixture(scope="module")
def micro_sft(tmp_path_factory):
    return sft_checkpoint("micro", SftRecipe(steps=10, batch=8), cache_dir=tmp_path_factory.mktemp("sft"),
                          log=lambda line: None)


def test_detach_off_policy_is_refused_before_anything_runs(tmp_path, capsys):
    assert main(["train", "--algo", "ppo", "--old-logprob", "detach", "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "strictly on-policy" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_short_run_writes_metrics_and_report(micro_sft, tmp_path, capsys):
    results = tmp_path / "train.jsonl"
    code = main(["train", "--model", "micro", "--checkpoint", str(micro_sft), "--steps", "2", "--prompts", "2",
                 "--group", "2", "--eval-prompts", "2", "--old-logprob", "recompute", "--correction", "mis",
                 "--results", str(results), "--report", str(tmp_path / "plot")])
    assert code == 0
    out = capsys.readouterr()
    assert "held-out reward: before" in out.out and "step   2/2" in out.err
    properties = [record["property"] for record in read_records(results)]
    assert properties == ["trainer.eval", "trainer.step", "trainer.step", "trainer.eval"]
    suffix = ".png" if importlib.util.find_spec("matplotlib") else ".html"
    assert (tmp_path / f"plot{suffix}").stat().st_size > 0
