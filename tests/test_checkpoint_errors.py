"""A --checkpoint folder that cannot be used is refused at the boundary with one line naming what is wrong; on the
command line that is exit status 2."""

import json
import shutil

import pytest

from rlparity.cli import main
from rlparity.errors import RlparityError
from rlparity.models import validate_checkpoint
from rlparity.models.language import vocabulary
from rlparity.models.tokenizer import write_tokenizer


@pytest.fixture
def folder(micro_checkpoint, tmp_path):
    folder = tmp_path / "my-gpt-oss"
    shutil.copytree(micro_checkpoint, folder, ignore=shutil.ignore_patterns("rlparity-build.json"))
    return folder


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def split_into_shards(folder, missing: bool):
    """model.safetensors as a one-shard index; the shard itself left out when `missing`."""
    shard = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(folder / shard)
    from safetensors import safe_open

    with safe_open(str(folder / shard), framework="pt") as handle:
        names = list(handle.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    if missing:
        (folder / shard).unlink()


def other_tokenizer(tmp_path):
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    write_tokenizer(vocabulary(1024, seed=5), other, 4096)  # same special ids, other names for the rest
    return other


PROBLEMS = {
    "missing_folder": (lambda f: shutil.rmtree(f), "does not exist or is not a folder; expected a GPT-OSS checkpoint"),
    "no_config": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "not_gpt_oss": (lambda f: edit_config(f, lambda c: c.update(model_type="llama")),
                    "is not a GPT-OSS-like config: model_type is 'llama', expected 'gpt_oss'"),
    "no_experts": (lambda f: edit_config(f, lambda c: c.pop("num_local_experts")),
                   "num_local_experts is None, expected a positive integer"),
    "quantised": (lambda f: edit_config(f, lambda c: c.update(quantization_config={"quant_method": "mxfp4"})),
                  r"has quantization_config \(mxfp4\): rlparity compares unquantised weights"),
    "no_safetensors": (lambda f: (f / "model.safetensors").unlink(),
                       r"has no weights: expected model.safetensors or .*it has no \*.safetensors file"),
    "missing_shard": (lambda f: split_into_shards(f, missing=True),
                      r"model.safetensors.index.json names 1 of its 1 shards that are not in the folder: "
                      r"\['model-00001-of-00001.safetensors'\]"),
    "no_sinks": (None, r"missing tensors \['model.layers.0.self_attn.sinks'"),
    "no_tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
}


def drop_sinks(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.endswith("sinks")}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_each_problem_is_one_line_naming_it(folder, problem):
    change, message = PROBLEMS[problem]
    (change or drop_sinks)(folder)
    with pytest.raises(RlparityError, match=message) as caught:
        validate_checkpoint(folder)
    assert "\n" not in str(caught.value)


def test_a_sharded_checkpoint_with_every_shard_is_accepted(folder):
    split_into_shards(folder, missing=False)
    assert validate_checkpoint(folder) == folder.resolve()


@pytest.mark.parametrize("argv", [
    ["check", "parity", "--b", "reference:float64"],
    ["python -m rlparity.parity", "preflight", "--b", "reference:float64"],
    ["diff", "--a", "hf", "--b", "reference:float64"],
    ["routing", "--a", "hf", "--b", "reference"],
    ["memory", "--tokens", "64"],
], ids=["check_parity", "preflight", "diff", "routing", "memory"])
def test_every_command_refuses_a_bad_folder_with_exit_2(folder, capsys, argv):
    edit_config(folder, lambda c: c.update(model_type="llama"))
    if argv[0] == "python -m rlparity.parity":
        from rlparity.parity.__main__ import main as parity_main

        code = parity_main([*argv[1:], "--checkpoint", str(folder)])
    else:
        code = main([*argv, "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "model_type is 'llama', expected 'gpt_oss'" in err and err.count("\n") == 1


def test_sides_whose_tokenizers_differ_are_refused_naming_the_id(folder, tmp_path, capsys):
    other = other_tokenizer(tmp_path)
    code = main(["check", "parity", "--checkpoint", str(folder), "--a", "hf:float32", "--b", "reference:float64",
                 "--b-option", f'tokenizer="{other}"'])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "mismatched tokenizers: hf[float32]" in err and "reference[float64" in err and " in hf[float32], " in err


def test_the_trainer_refuses_a_checkpoint_in_another_language(folder, tmp_path, capsys):
    write_tokenizer(vocabulary(1024, seed=5), folder, 4096)
    code = main(["train", "--model", "micro", "--checkpoint", str(folder), "--steps", "1",
                 "--results", str(tmp_path / "train.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "the tool task is written in the synthetic language of bundled model 'micro'" in err
    assert "mismatched tokenizers" in err and err.count("\n") == 1
