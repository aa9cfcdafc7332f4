"""`rlparity memory`: the phase table, the budget verdict in the exit status, errors at the boundary.

The parser is built here the way rlparity.cli builds its subcommands, so these tests do not depend on
the line that wires `memory` into the main command.
"""

import argparse

import pytest

from rlparity.errors import RlparityError
from rlparity.memory.cli import add_memory_parser, memory_command


def _parse(argv):
    parser = argparse.ArgumentParser(prog="rlparity")
    add_memory_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["memory", *argv])


def test_parser_dispatches_to_memory_command():
    args = _parse(["--model", "gpt-oss-20b", "--tokens", "24576"])
    assert args.run is memory_command
    assert (args.world, args.attention, args.logprob_chunk, args.checkpointing) == (1, "triton", 1024, True)


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
def test_real_size_tables_print_every_phase(model, capsys):
    code = memory_command(_parse(["--model", model, "--tokens", "24576", "--world", "16", "--attention", "triton"]))
    out = capsys.readouterr().out
    assert code == 0
    for row in ("weights", "gradients", "optimizer state (AdamW)", "FSDP gather buffers", "checkpointed layer inputs",
                "experts", "attention", "router", "peak in forward", "peak in backward", "peak in optimizer",
                "ceiling (peak + 10%)"):
        assert row in out, row
    assert "<- peak" in out


def test_budget_sets_the_exit_status(capsys):
    fits = memory_command(_parse(["--model", "gpt-oss-20b", "--tokens", "24576", "--world", "16", "--budget", "80GiB"]))
    assert fits == 0 and "fits (" in capsys.readouterr().out
    naive = ["--model", "gpt-oss-20b", "--tokens", "24576", "--world", "16", "--budget", "80GiB",
             "--attention", "eager", "--logprob-chunk", "none", "--no-checkpointing"]
    assert memory_command(_parse(naive)) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "full-vocabulary logits" in out


def test_verify_measures_a_layer_and_the_logprob_pass_on_meta(capsys):
    assert memory_command(_parse(["--model", "gpt-oss-20b", "--tokens", "8192", "--verify"])) == 0
    out = capsys.readouterr().out
    assert "decoder layer: peak.backward: measured" in out
    assert "log-prob pass: peak.forward: measured" in out


def test_errors_name_what_was_expected(capsys):
    with pytest.raises(RlparityError, match="unknown model 'gpt-oss-2b': expected one of gpt-oss-120b, gpt-oss-20b"):
        memory_command(_parse(["--model", "gpt-oss-2b", "--tokens", "128"]))
    with pytest.raises(RlparityError, match="--tokens must be at least 2"):
        memory_command(_parse(["--model", "micro", "--tokens", "1"]))
    with pytest.raises(RlparityError, match="chunked backend cannot run"):
        memory_command(_parse(["--model", "micro", "--tokens", "64", "--attention", "chunked", "--verify"]))
    for bad in (["--budget", "80XB"], ["--logprob-chunk", "-3"]):
        with pytest.raises(SystemExit):
            _parse(["--model", "micro", "--tokens", "64", *bad])
    err = capsys.readouterr().err
    assert "cannot read '80XB' as a size" in err and "expected a positive number of tokens or 'none'" in err
