"""The synthetic language and its tokenizer: deterministic, self-consistent, and lossless on token ids."""

import operator
import random

import pytest
from transformers import AutoTokenizer

from rlparity.models.language import EOS, FIXED_TOKENS, PAD, Language, invented_names, render, vocabulary
from rlparity.models.tokenizer import build_tokenizer

VOCAB_SIZE = 1024
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.fixture(scope="module")
def language():
    return Language(VOCAB_SIZE, seed=0)


def documents(language, seed, count):
    stream = language.documents(seed)
    return [next(stream) for _ in range(count)]


def test_vocabulary_is_fixed_tokens_then_distinct_names():
    tokens = vocabulary(VOCAB_SIZE, seed=0)
    assert len(tokens) == len(set(tokens)) == VOCAB_SIZE
    assert tuple(tokens[: len(FIXED_TOKENS)]) == FIXED_TOKENS
    assert all(name.isalpha() and name.islower() for name in tokens[len(FIXED_TOKENS):])


def test_names_depend_on_the_seed_only():
    assert invented_names(50, seed=3) == invented_names(50, seed=3)
    assert invented_names(50, seed=3) != invented_names(50, seed=4)


def test_document_stream_is_reproducible(language):
    assert documents(language, 11, 20) == documents(Language(VOCAB_SIZE, seed=0), 11, 20)
    assert documents(language, 11, 20) != documents(language, 12, 20)


def test_documents_state_the_world_truthfully(language):
    checked = {"fact": 0, "arithmetic": 0, "recall": 0}
    for document in documents(language, 5, 400):
        assert document[-1] == EOS
        text = render(document[:-1])
        if document[0] == "the":  # fact document: "the <attribute> of <name> is <value> ."
            for sentence in filter(None, text.split(" .")):
                _, attribute, _, name, _, *value = sentence.split()
                expected = language.world.attribute(name, attribute)
                assert "".join(value) == str(expected), sentence
                checked["fact"] += 1
        elif "=" in document and "?" not in document and "," not in document and document[0].isdigit():
            for sentence in filter(None, text.split(" .")):
                left, right = sentence.replace(" ", "").split("=")
                op = next(symbol for symbol in "+-*" if symbol in left)
                a, b = map(int, left.split(op))
                assert OPERATIONS[op](a, b) == int(right), sentence
                checked["arithmetic"] += 1
        elif "?" in document and document[0] != "<|start|>":  # recall: "k = v , ... . k ? v ."
            context, query = text.split(" . ", 1)
            pairs = dict(pair.split(" = ") for pair in context.split(" , "))
            asked, answer = query.rstrip(" .").split(" ? ")
            assert pairs[asked] == answer
            checked["recall"] += 1
    assert all(count > 20 for count in checked.values()), checked


def test_tokenizer_encodes_rendered_documents_to_their_ids(language):
    tokenizer = build_tokenizer(language.tokens)
    for document in documents(language, 8, 200):
        ids = [language.ids[token] for token in document]
        assert tokenizer.encode(render(document)).ids == ids
        assert tokenizer.encode(tokenizer.decode(ids, skip_special_tokens=False)).ids == ids


def test_decode_encode_round_trips_arbitrary_ids(language):
    tokenizer = build_tokenizer(language.tokens)
    rng = random.Random(0)
    unk = language.ids["<|unk|>"]
    for _ in range(50):
        ids = [rng.randrange(VOCAB_SIZE) for _ in range(40)]
        ids = [i for i in ids if i != unk]
        assert tokenizer.encode(tokenizer.decode(ids, skip_special_tokens=False)).ids == ids


def test_tokenizer_splits_unspaced_text(language):
    tokenizer = build_tokenizer(language.tokens)
    tokens = tokenizer.encode("<|start|>user<|message|>what is 12+7?<|end|>").tokens
    assert tokens == ["<|start|>", "user", "<|message|>", "what", "is", "1", "2", "+", "7", "?", "<|end|>"]


def test_checkpoint_tokenizer_loads_with_auto_tokenizer(micro_checkpoint, language):
    tokenizer = AutoTokenizer.from_pretrained(micro_checkpoint)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == language.ids[EOS]
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == language.ids[PAD]
    document = documents(language, 9, 1)[0]
    assert tokenizer(render(document))["input_ids"] == [language.ids[token] for token in document]
