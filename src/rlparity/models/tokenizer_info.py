"""What identifies a tokenizer for parity purposes: its id -> token table and its eos/pad tokens.

Two engines can only be compared on token ids if the ids mean the same tokens on both sides; a
tokenizer taken from another model (or another revision) is the usual way that silently breaks.
"""

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from rlparity.errors import RlparityError


@dataclass(frozen=True)
class TokenizerInfo:
    source: str
    tokens: tuple[str, ...]  # tokens[i] is id i ("" where the tokenizer has no id i)
    eos_token: str | None
    pad_token: str | None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def token_to_id(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    @functools.cached_property
    def fingerprint(self) -> str:
        payload = json.dumps([self.tokens, self.eos_token, self.pad_token]).encode()
        return hashlib.sha256(payload).hexdigest()


def special_token(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_info(path: Path) -> TokenizerInfo:
    """From a checkpoint folder or a tokenizer.json (with tokenizer_config.json beside it, if any)."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise RlparityError(f"no tokenizer at {file}: expected a tokenizer.json made by the `tokenizers` library")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises plain Exception for a malformed file
        raise RlparityError(f"{file} is not a readable tokenizer.json: {exc}") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    tokens = tuple(tokenizer.id_to_token(i) or "" for i in range(size))
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return TokenizerInfo(source=str(file), tokens=tokens, eos_token=special_token(config.get("eos_token")),
                         pad_token=special_token(config.get("pad_token")))


def require_same_tokenizer(name_a: str, a: TokenizerInfo, name_b: str, b: TokenizerInfo) -> None:
    """Raises, naming the first difference, unless both sides map every id to the same token."""
    if a.fingerprint == b.fingerprint:
        return
    if a.tokens != b.tokens:
        differing = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), None)
        if differing is not None:
            detail = f"id {differing} is {a.tokens[differing]!r} in {name_a}, {b.tokens[differing]!r} in {name_b}"
        else:
            detail = (f"{name_a} has {a.vocab_size} tokens, {name_b} has {b.vocab_size}; "
                      "the shorter is a prefix of the longer")
    else:
        detail = (f"eos/pad tokens differ: {name_a} ({a.eos_token!r}, {a.pad_token!r}), "
                  f"{name_b} ({b.eos_token!r}, {b.pad_token!r})")
    raise RlparityError(f"mismatched tokenizers: {name_a} ({a.source}) and {name_b} ({b.source}) do not give token ids "
                        f"the same meaning: {detail}")
