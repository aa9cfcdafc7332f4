"""The first-diverging-layer diff on `micro`: matching engines show nothing above the noise floor; an engine
attending past the sliding window is localised to layer 0's attention from the window's first token on."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from rlparity.engines import RAW, capture_points, open_engine
from rlparity.errors import RlparityError
from rlparity.parity import layer_diff, naive_floors
from rlparity.parity.__main__ import main
from rlparity.parity.batch import language_tokens
from rlparity.parity.diff_command import add_diff_parser, run_diff
from tests.planted_engines import hf_without_sliding_window

TOKENS = 48  # micro slides over 8 tokens in layer 0


@pytest.fixture(scope="module")
def tokens():
    return language_tokens("micro", seed=5, lengths=[TOKENS])[0]


@pytest.fixture(scope="module")
def floors(micro_checkpoint, reference_micro, tokens):
    naive = open_engine("reference", micro_checkpoint, dtype=torch.float32)
    return naive_floors(naive, reference_micro, tokens, num_layers=2)


def test_matching_engines_stay_under_every_floor(hf_micro, reference_micro, tokens, floors):
    report = layer_diff(hf_micro, reference_micro, tokens, floors, "float32")
    assert [point.name for point in report.points] == capture_points(2)
    assert report.first is None and report.hint == "no capture point is above its noise floor", report.table()
    assert all(point.floor > 0 for point in report.points if point.name != "embed")


def test_an_ignored_sliding_window_is_localised(hf_micro, micro_checkpoint, tokens, floors, tmp_path):
    no_window = hf_without_sliding_window(micro_checkpoint, tmp_path / "no-window")
    report = layer_diff(hf_micro, no_window, tokens, floors, "float32")
    window = hf_micro.config["sliding_window"]
    first = report.first
    assert first is not None and first.name == "layers.0.attn" and first.first_token == window, report.table()
    assert "ignores or misplaces the sliding window" in report.hint
    assert report.points[0].name == "embed" and not report.points[0].above
    table = "\n".join(report.table())
    assert "<-- first above its floor" in table and "routed differently" in table


def test_an_engine_that_cannot_capture_is_refused(hf_micro, reference_micro, tokens, floors):
    class LogprobsOnly:
        name, tokenizer, config = "logprobs-only", reference_micro.tokenizer, reference_micro.config

        def logprobs(self, token_ids, prompt_len, sampling=RAW):
            return reference_micro.logprobs(token_ids, prompt_len, sampling)

    with pytest.raises(RlparityError, match="logprobs-only cannot report its activations"):
        layer_diff(hf_micro, LogprobsOnly(), tokens, floors, "float32")


@pytest.fixture
def micro_cache(micro_checkpoint, monkeypatch):
    """Points the model cache at the session's micro build, so `--model micro` finds it."""
    monkeypatch.setenv("RLPARITY_CACHE", str(micro_checkpoint.parent.parent))


def test_command_prints_the_table_and_writes_a_record(micro_cache, tmp_path, capsys):
    results = tmp_path / "diff.jsonl"
    status = main(["diff", "--a", "hf", "--b", "reference:float64", "--model", "micro", "--tokens", "24",
                   "--results", str(results)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "capture point" in out and "layers.1.mlp" in out and "no capture point is above its noise floor" in out
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["property"] == "logprob_parity.first_diverging_layer" and record["verdict"] == "pass"
    assert record["subject"] == "hf[float32] vs reference[float64]"
    assert [point["name"] for point in record["extra"]["points"]] == capture_points(2)


def test_add_diff_parser_wires_into_any_command(micro_cache):
    parser = argparse.ArgumentParser(prog="rlparity")
    add_diff_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diff", "--a", "hf:bf16", "--b", "vllm", "--b-option", 'hf_overrides={"x": null}'])
    assert args.run is run_diff and args.a == "hf:bf16" and args.b_option == [("hf_overrides", {"x": None})]


def test_the_parser_loads_without_torch():
    """`rlparity --help` must stay instant: adding the diff parser imports the standard library only."""
    code = ("import argparse, sys; from rlparity.parity.diff_command import add_diff_parser; "
            "add_diff_parser(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("argv, message", [
    (["--a", "sglangx", "--b", "hf"], "unknown engine 'sglangx' in 'sglangx': expected one of"),
    (["--a", "hf:fp8", "--b", "hf"], "unknown dtype 'fp8'"),
    (["--a", "hf", "--b", "hf", "--tokens", "1"], "--tokens must be at least 2"),
], ids=["engine", "dtype", "tokens"])
def test_bad_arguments_are_named(micro_cache, capsys, argv, message):
    assert main(["diff", "--model", "micro", *argv]) == 2
    assert message in capsys.readouterr().err
