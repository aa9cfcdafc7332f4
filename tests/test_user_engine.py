"""A user's engine given as --engine NAME=module:Class goes wherever a bundled engine does, on `micro`: check parity
(a planted temperature named by the preflight), the preflight command, diff and routing; bad specs and missing
capabilities are one-line errors (exit 2), an engine that cannot run here is skipped (exit 3)."""

from pathlib import Path

import pytest

from rlparity.cli import main
from rlparity.engines import RAW, Routing, register_user_engine
from rlparity.engines.hf import HFEngine
from rlparity.errors import RlparityError
from rlparity.parity import calibrate, parity_batch
from rlparity.parity.__main__ import main as parity_main
from rlparity.parity.floors import save_floors
from rlparity.results import read_records

pytestmark = pytest.mark.usefixtures("forget_user_engines")

HERE = "tests.test_user_engine"
DOCS_ENGINES = Path(__file__).parents[1] / "docs" / "engines"


class HooksEngine:
    """A user's engine with every capability (logprobs, routing, hidden_states): transformers' GPT-OSS through
    rlparity's hf engine, under a class and a name of the user's."""

    def __init__(self, checkpoint, *, dtype, max_len=None):
        self.inner = HFEngine(checkpoint, dtype=dtype, max_len=max_len)

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, prompt_len, sampling)

    def routing(self, token_ids) -> Routing:
        return self.inner.routing(token_ids)

    def hidden_states(self, token_ids):
        return self.inner.hidden_states(token_ids)


class NeedsCuda(HooksEngine):
    def __init__(self, checkpoint, *, dtype, max_len=None):
        raise NotImplementedError("this engine needs CUDA; run it on a GPU machine")


class Float32Only(HooksEngine):
    dtypes = ("float32",)


class ReturnsATensor(HooksEngine):
    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, prompt_len, sampling)[0]


class NoLogprobs:
    def __init__(self, checkpoint, *, dtype, max_len=None):
        pass


@pytest.fixture
def micro_cache(micro_checkpoint, monkeypatch):
    """Points the model cache at the session's micro build, so `--model micro` finds it."""
    monkeypatch.setenv("RLPARITY_CACHE", str(micro_checkpoint.parent.parent))


@pytest.fixture(scope="module")
def micro_floors(micro_checkpoint, tmp_path_factory):
    """micro's float32 noise floors (a second: the calibration pairs on micro's parity batch)."""
    entry = calibrate("micro", micro_checkpoint, parity_batch("micro"), dtypes=("float32",), log=lambda message: None)
    return save_floors(entry, tmp_path_factory.mktemp("floors") / "noise_floors.json")


def check_parity(a, b, specs, floors, results, *extra):
    engines = [argument for spec in specs for argument in ("--engine", spec)]
    return main(["check", "parity", "--a", a, "--b", b, *engines, "--model", "micro", "--floors", str(floors),
                 "--results", str(results), *extra])


def test_an_honest_user_engine_passes_check_parity(micro_cache, micro_floors, tmp_path, capsys):
    results = tmp_path / "parity.jsonl"
    status = check_parity("hf:float32", "hooks:float32", [f"hooks={HERE}:HooksEngine"], micro_floors, results)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "semantics preflight: hf[eager,eager,float32] (trainer) vs hooks[float32] (engine)" in out
    assert "hf-fp32_vs_hooks-fp32" in out and "pass" in out
    preflight_record, pair_record = read_records(results)
    assert preflight_record["property"] == "logprob_parity.semantics" and preflight_record["verdict"] == "pass"
    assert pair_record["subject"] == "hf[float32] vs hooks[float32]" and pair_record["verdict"] == "pass"
    assert pair_record["extra"]["floor"] == "cross" and pair_record["dtype"] == "float32"
    assert pair_record["error"] <= pair_record["tolerance"]


def test_a_planted_temperature_is_named_by_the_preflight(micro_cache, micro_floors, tmp_path, capsys):
    results = tmp_path / "parity.jsonl"
    status = check_parity("hf:float32", "hot:float32", ["hot=tests.planted_engines:TemperatureScaledAsRaw"],
                          micro_floors, results)
    out = capsys.readouterr().out
    assert status == 1, out
    assert "[mismatch] log-probs [raw]: hot[float32]'s log-probs differ" in out
    assert "processed log-probs where raw ones were asked; temperature 0.7" in out
    assert "semantics differ: log-probs [raw]: temperature 0.7" in out
    preflight_record, pair_record = read_records(results)
    assert preflight_record["verdict"] == "fail" and pair_record["verdict"] == "fail"
    (finding,) = [f for f in preflight_record["extra"]["findings"] if f["status"] == "mismatch"]
    assert finding["parameters"]["temperature"] == 0.7


def test_the_preflight_command_takes_a_user_engine(micro_cache, micro_floors, capsys):
    status = parity_main(["preflight", "--b", "hot:float32", "--engine",
                          "hot=tests.planted_engines:TemperatureScaledAsRaw", "--model", "micro", "--floors",
                          str(micro_floors)])
    out = capsys.readouterr().out
    assert status == 1 and "[mismatch] log-probs [raw]" in out and "temperature 0.7" in out, out


def test_an_engine_that_cannot_run_in_the_dtype_checks_nothing(micro_cache, micro_floors, tmp_path, capsys):
    status = check_parity("hf:float32", "lim:bf16", [f"lim={HERE}:Float32Only"], micro_floors, tmp_path / "r.jsonl")
    out = capsys.readouterr().out
    assert status == 3, out
    assert "engine 'lim' cannot run here: it runs in ['float32'] (its dtypes attribute), not bfloat16" in out
    assert out.rstrip().endswith("nothing was checked for hf[float32] vs lim[bfloat16]")
    assert read_records(tmp_path / "r.jsonl")[-1]["verdict"] == "skip"


def test_an_answer_of_the_wrong_shape_is_an_error_naming_it(micro_cache, micro_floors, tmp_path, capsys):
    status = check_parity("hf:float32", "flat:float32", [f"flat={HERE}:ReturnsATensor"], micro_floors,
                          tmp_path / "r.jsonl")
    out = capsys.readouterr().out
    assert status == 1 and "flat[float32].logprobs returned Tensor for 8 sequences; expected a list" in out, out


def test_diff_runs_on_a_user_engine(micro_cache, tmp_path, capsys):
    results = tmp_path / "diff.jsonl"
    status = main(["diff", "--a", "hf", "--b", "hooks", "--engine", f"hooks={HERE}:HooksEngine", "--model", "micro",
                   "--tokens", "24", "--results", str(results)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "layers.1.mlp" in out and "no capture point is above its noise floor" in out
    (record,) = read_records(results)
    assert record["subject"] == "hf[float32] vs hooks[float32]" and record["verdict"] == "pass"


def test_routing_runs_on_a_user_engine(micro_checkpoint, tmp_path, capsys):
    results = tmp_path / "routing.jsonl"
    status = main(["routing", "--a", "reference", "--b", "hooks", "--engine", f"hooks={HERE}:HooksEngine",
                   "--model", str(micro_checkpoint), "--sequences", "2", "--length", "24", "--results", str(results)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "hooks[float32] vs reference[float64]: 48 tokens" in out
    (record,) = read_records(results)
    assert (record["property"], record["verdict"]) == ("routing.agreement", "pass")


@pytest.mark.parametrize("command", ["diff", "routing"])
def test_an_unavailable_user_engine_checks_nothing(command, micro_cache, micro_checkpoint, capsys):
    model = ["--model", "micro"] if command == "diff" else ["--model", str(micro_checkpoint)]
    status = main([command, "--a", "hf", "--b", "cuda", "--engine", f"cuda={HERE}:NeedsCuda", *model])
    out = capsys.readouterr().out
    assert status == 3, out
    assert "engine 'cuda' cannot run here: this engine needs CUDA; run it on a GPU machine" in out
    assert "nothing was checked for" in out


@pytest.mark.parametrize("argv, message", [
    (["routing", "--a", "hf", "--b", "plain", "--engine", "plain=plain_transformers:PlainTransformersEngine"],
     "routing: engine 'plain' has no routing(token_ids) method"),
    (["diff", "--a", "hf", "--b", "plain", "--engine", "plain=plain_transformers:PlainTransformersEngine",
      "--tokens", "24"], "plain[float32] cannot report its activations (no hidden_states)"),
], ids=["routing", "diff"])
def test_a_missing_capability_is_a_one_line_error(argv, message, micro_cache, micro_checkpoint, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(DOCS_ENGINES))
    model = ["--model", str(micro_checkpoint)] if argv[0] == "routing" else ["--model", "micro"]
    assert main([*argv, *model]) == 2
    err = capsys.readouterr().err  # transformers' loading progress may come first
    assert err.endswith("\n") and message in err.splitlines()[-1], err


@pytest.mark.parametrize("spec, message", [
    ("noequals", "--engine 'noequals': expected NAME=module:Class"),
    ("x=nomodule:Cls", "engine 'x', class 'nomodule:Cls': cannot import module 'nomodule': ModuleNotFoundError"),
    (f"hf={HERE}:HooksEngine", "'hf' is one of rlparity's own engines"),
    (f"nolp={HERE}:NoLogprobs", "'NoLogprobs' has no logprobs method"),
    ("1x=tests.planted_engines:TemperatureScaledAsRaw", "the name '1x' must start with a letter"),
], ids=["no_equals", "no_module", "bundled_name", "no_logprobs", "bad_name"])
@pytest.mark.parametrize("command", ["check", "diff", "routing"])
def test_a_bad_engine_spec_exits_2_with_one_line(command, spec, message, capsys):
    argv = {"check": ["check", "parity", "--b", "x"], "diff": ["diff", "--a", "hf", "--b", "x"],
            "routing": ["routing", "--a", "hf", "--b", "x"]}[command]
    assert main([*argv, "--engine", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlparity: error: ") and message in err and err.count("\n") == 1, err


def test_registration_is_idempotent_and_names_clash_once():
    assert register_user_engine(f"twice={HERE}:HooksEngine") == "twice"
    assert register_user_engine(f"twice={HERE}:HooksEngine") == "twice"
    with pytest.raises(RlparityError, match=f"'twice' is already registered as {HERE}:HooksEngine"):
        register_user_engine(f"twice={HERE}:Float32Only")
