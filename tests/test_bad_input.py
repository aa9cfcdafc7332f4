"""Bad input to the models and engines fails at the boundary with an error naming the problem."""

import json
import shutil

import pytest

from rlparity.engines import open_engine, require_same_tokenizers
from rlparity.errors import RlparityError
from rlparity.models import open_checkpoint
from rlparity.models.language import vocabulary
from rlparity.models.tokenizer import write_tokenizer

ENGINES = ("hf", "reference")


@pytest.fixture
def checkpoint_copy(micro_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(micro_checkpoint, folder)
    return folder


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_checkpoint(engine, tmp_path):
    with pytest.raises(RlparityError, match=r"checkpoint .*nowhere does not exist .*python -m rlparity.models build"):
        open_engine(engine, tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json"])
def test_checkpoint_without_a_required_file(checkpoint_copy, missing):
    (checkpoint_copy / missing).unlink()
    with pytest.raises(RlparityError, match=f"has no {missing}"):
        open_checkpoint(checkpoint_copy)


def test_checkpoint_without_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(RlparityError, match="has no weights: expected model.safetensors"):
        open_checkpoint(checkpoint_copy)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(model_type="llama"), "model_type is 'llama', expected 'gpt_oss'"),
    (lambda c: c.update(architectures=["LlamaForCausalLM"]), "expected it to contain 'GptOssForCausalLM'"),
    (lambda c: c.pop("num_local_experts"), "num_local_experts is None, expected a positive integer"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads=3 does not divide num_attention_heads=4"),
    (lambda c: c.update(num_experts_per_tok=5), "num_experts_per_tok=5 exceeds num_local_experts=4"),
    (lambda c: c.update(layer_types=["sliding_attention"]), "expected a list of 2 entries"),
    (lambda c: c.update(layer_types=["chunked_attention", "full_attention"]), r"contains \['chunked_attention'\]"),
    (lambda c: c.update(sliding_window=None), "sliding_window is None, expected a positive integer"),
    (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "expected GPT-OSS's YaRN"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 32.0}), r"YaRN parameters \['beta_fast'"),
    (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings is True, expected false"),
], ids=["model_type", "architectures", "no_experts", "gqa", "top_k", "layer_count", "layer_type", "window",
        "rope_type", "yarn_keys"] + ["tied"])
def test_config_that_is_not_gpt_oss_like(checkpoint_copy, change, message):
    edit_config(checkpoint_copy, change)
    with pytest.raises(RlparityError, match=f"is not a GPT-OSS-like config:(.|\n)*{message}"):
        open_checkpoint(checkpoint_copy)


def test_config_json_that_is_not_json(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{model_type: gpt_oss")
    with pytest.raises(RlparityError, match="config.json is not valid JSON"):
        open_checkpoint(checkpoint_copy)


def test_config_that_does_not_match_the_weights(checkpoint_copy):
    edit_config(checkpoint_copy, lambda c: c.update(intermediate_size=96))
    with pytest.raises(RlparityError, match=r"model.layers.0.mlp.experts.down_proj has shape \(4, 64, 64\), "
                                            r"the config implies \(4, 96, 64\)"):
        open_checkpoint(checkpoint_copy)


def test_unreadable_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RlparityError, match="model.safetensors is not readable safetensors"):
        open_checkpoint(checkpoint_copy)


@pytest.mark.parametrize("engine", ENGINES)
def test_sequence_longer_than_the_engine_max_length(engine, micro_checkpoint):
    opened = open_engine(engine, micro_checkpoint, max_len=16)
    too_long = [5] * 17
    with pytest.raises(RlparityError, match="sequence 0 has 17 tokens, more than the engine's max length 16"):
        opened.logprobs([too_long], [4])
    with pytest.raises(RlparityError, match="has 17 tokens, more than the engine's max length 16"):
        opened.routing(too_long)
    with pytest.raises(RlparityError, match="has 17 tokens, more than the engine's max length 16"):
        opened.hidden_states(too_long)
    opened.logprobs([too_long[:16]], [4])  # the limit itself is accepted


def test_default_max_lengths(hf_micro, reference_micro):
    assert hf_micro.max_len == 131072  # max_position_embeddings
    assert reference_micro.max_len == 4096  # REFERENCE_MAX_LEN: the dense float64 scores' memory
    with pytest.raises(RlparityError, match="131073 tokens, more than the engine's max length 131072"):
        hf_micro.logprobs([[5] * 131073], [1])


@pytest.mark.parametrize("engine", ENGINES)
def test_max_len_beyond_the_model(engine, micro_checkpoint):
    with pytest.raises(RlparityError, match=r"max_len 200000 must be in \[1, 131072\]"):
        open_engine(engine, micro_checkpoint, max_len=200000)


@pytest.mark.parametrize(("token_ids", "prompt_len", "message"), [
    ([[5, 6, 7]], [0], r"prompt_len 0; expected 1 <= prompt_len < 3"),
    ([[5, 6, 7]], [3], r"prompt_len 3; expected 1 <= prompt_len < 3"),
    ([[5, 6, 7], [5, 6]], [1], r"expected one prompt length per sequence \(2\), got 1 prompt lengths"),
    ([[5, 6, 7]], 1, r"expected one prompt length per sequence \(1\), got 1"),
    ([[5, 1024, 7]], [1], r"token id 1024, outside the vocabulary \[0, 1024\)"),
    ([[5, -1, 7]], [1], r"token id -1, outside the vocabulary"),
    ([[]], [1], "sequence 0 is empty"),
], ids=["prompt0", "prompt_all", "counts", "scalar", "id_high", "id_negative", "empty"])
def test_malformed_requests(hf_micro, reference_micro, token_ids, prompt_len, message):
    for engine in (hf_micro, reference_micro):
        with pytest.raises(RlparityError, match=message):
            engine.logprobs(token_ids, prompt_len)


def test_tokenizer_larger_than_the_model_vocabulary(checkpoint_copy):
    write_tokenizer(vocabulary(2000, seed=0), checkpoint_copy, 4096)
    message = "mismatched tokenizer(.|\n)*2000 tokens, more than the model's vocab_size 1024"
    with pytest.raises(RlparityError, match=message):
        open_checkpoint(checkpoint_copy)


def test_tokenizer_whose_eos_is_elsewhere(checkpoint_copy):
    tokens = vocabulary(1024, seed=0)
    tokens[1], tokens[500] = tokens[500], tokens[1]  # <|endoftext|> moves from id 1 to id 500
    write_tokenizer(tokens, checkpoint_copy, 4096)
    with pytest.raises(RlparityError, match=r"config eos_token_id is 1 \(\[.*\]\), but the tokenizer's eos_token is "
                                            r"'<\|endoftext\|>' \(id 500\)"):
        open_checkpoint(checkpoint_copy)


def test_engines_with_different_tokenizers(micro_checkpoint, hf_micro, tmp_path):
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    tokens = vocabulary(1024, seed=5)  # same special ids, different invented names
    write_tokenizer(tokens, other, 4096)
    reference = open_engine("reference", micro_checkpoint, tokenizer=other)
    first = next(i for i, (a, b) in enumerate(zip(hf_micro.tokenizer.tokens, tokens)) if a != b)
    with pytest.raises(RlparityError, match=f"mismatched tokenizers: hf.* and reference.* id {first} is "):
        require_same_tokenizers(hf_micro, reference)
    require_same_tokenizers(hf_micro, open_engine("reference", micro_checkpoint))


@pytest.mark.parametrize(("implementation", "reason"), [
    ("sdpa", "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"),
    ("flex_attention", "Attention sinks cannot be run on CPU with flex attention"),
    ("no_such_attention", "no_such_attention"),
])
def test_unavailable_attention_implementation(micro_checkpoint, implementation, reason):
    with pytest.raises(RlparityError, match=f"attn_implementation='{implementation}' here: .*{reason}"):
        open_engine("hf", micro_checkpoint, attn_implementation=implementation)


def test_unsupported_dtype_and_experts(micro_checkpoint):
    with pytest.raises(RlparityError, match=r"dtype 'float16' is not supported; expected one of \["):
        open_engine("hf", micro_checkpoint, dtype="float16")
    with pytest.raises(RlparityError, match="experts_implementation 'megablocks' is not one of"):
        open_engine("hf", micro_checkpoint, experts_implementation="megablocks")
