"""`rlparity routing` on the micro model: the per-layer table, the census, the record; bad arguments."""

import argparse

import pytest

from rlparity.errors import RlparityError
from rlparity.results import read_records
from rlparity.routing.cli import add_routing_parser
from rlparity.routing.engines import open_routing_engine


def parse(argv):
    parser = argparse.ArgumentParser(prog="rlparity")
    add_routing_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["routing", *argv])


def test_routing_table_and_record(micro_checkpoint, tmp_path, capsys):
    results = tmp_path / "routing.jsonl"
    args = parse(["--a", "reference", "--b", "hf", "--b-dtype", "bfloat16", "--model", str(micro_checkpoint),
                  "--sequences", "2", "--length", "24", "--router-precision", "--results", str(results)])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "hf[eager,eager,bfloat16] vs reference[float64]: 48 tokens" in out
    assert "median gap@flip" in out and "near-tie census (reference[float64]'s gaps)" in out
    assert "router[bfloat16] in hf[eager,eager,bfloat16] vs router[float32] in hf[eager,eager,bfloat16]: 48" in out
    agreement, precision = read_records(results)
    assert (agreement["property"], agreement["verdict"]) == ("routing.agreement", "pass")
    assert precision["property"] == "routing.router_precision"
    layers = agreement["extra"]["comparison"]["layers"]
    assert [layer["layer"] for layer in layers] == [0, 1]
    assert all(sum(b["tokens"] for b in layer["bins"]) == 48 for layer in layers)


def test_unknown_model_is_refused(tmp_path):
    args = parse(["--a", "hf", "--b", "reference", "--model", str(tmp_path)])
    with pytest.raises(RlparityError, match="neither a bundled model .* nor a checkpoint folder"):
        args.run(args)


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--a", "hf", "--b", "hf", "--length", "0"])
    assert exit_info.value.code == 2


def test_an_engine_without_routes_is_named_before_anything_opens(tmp_path):
    args = parse(["--a", "sglang", "--b", "hf", "--model", str(tmp_path)])
    with pytest.raises(RlparityError, match=r"routing: unknown engine 'sglang'; expected one of \('hf', 'reference', "
                                            r"'vllm'\), or yours with --engine NAME=module:Class"):
        args.run(args)


def test_vllm_unavailable_says_why(micro_checkpoint, monkeypatch):
    monkeypatch.setenv("RLPARITY_VLLM_PYTHON", "/nonexistent/python")
    with pytest.raises(RlparityError, match="vllm engine is unavailable: RLPARITY_VLLM_PYTHON='/nonexistent/python' "
                                            "is not an executable file"):
        open_routing_engine("vllm", micro_checkpoint)


def test_reference_dtype_is_checked(micro_checkpoint):
    with pytest.raises(RlparityError, match="the reference engine runs in"):
        open_routing_engine("reference", micro_checkpoint, "bfloat16")


def test_replay_variants_table_and_records(micro_checkpoint, tmp_path, capsys):
    results = tmp_path / "replay.jsonl"
    args = parse(["--replay", "ids+weights", "--replay", "ids", "--a", "hf", "--a-dtype", "bfloat16", "--b",
                  "reference", "--model", str(micro_checkpoint), "--sequences", "2", "--length", "24", "--results",
                  str(results)])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "router |grad|" in out and "ids-reversed  reference[float64]" in out
    records = read_records(results)
    assert [(r["case"], r["verdict"]) for r in records] == [("ids+weights", "pass"), ("ids", "pass"),
                                                           ("ids-reversed", "pass")]
    assert records[0]["extra"]["router_grad_norm"] == 0 and records[1]["extra"]["router_grad_norm"] > 0


def test_replay_needs_the_trainer_as_side_a(micro_checkpoint):
    args = parse(["--replay", "r2", "--a", "reference", "--b", "hf", "--model", str(micro_checkpoint)])
    with pytest.raises(RlparityError, match="--a is the trainer and must be hf"):
        args.run(args)
