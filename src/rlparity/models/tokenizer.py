"""The bundled models' tokenizer, made locally with the `tokenizers` library (no hub).

A word-level model over the synthetic language's vocabulary: text is split on whitespace, then around
punctuation, then digit by digit; special tokens are matched first. Decoding joins tokens with spaces,
so decode -> encode returns the same ids for every sequence of non-unknown tokens.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from rlparity.models.language import EOS, PAD, SPECIAL_TOKENS, UNK

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tokenizer(tokens: list[str]) -> Tokenizer:
    """A tokenizer whose token i is tokens[i]."""
    tokenizer = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(tokens)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json: what `AutoTokenizer.from_pretrained` (and vLLM through it) reads."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def write_tokenizer(tokens: list[str], folder: Path, model_max_length: int) -> None:
    build_tokenizer(tokens).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n")
    special = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
