"""Do token ids survive decode -> encode? A pipeline that hands text between the rollout and the trainer
re-tokenizes it; ids that do not come back are scored as other tokens by the trainer."""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from rlparity.errors import RlparityError


def load_tokenizer(file: Path | str) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises plain Exception for a malformed file
        raise RlparityError(f"{file} is not a readable tokenizer.json: {exc}") from exc


def _token(tokenizer: Tokenizer, ids: list[int], at: int) -> str:
    return f"id {ids[at]} ({tokenizer.id_to_token(ids[at])!r})" if at < len(ids) else "past the end"


def round_trip_failures(file: Path | str, sequences: Sequence[Sequence[int]], limit: int = 3) -> list[str]:
    """One line per sequence whose ids change under decode -> encode (at most `limit`, then a count)."""
    tokenizer = load_tokenizer(file)
    failures = []
    for index, ids in enumerate(sequences):
        ids = [int(token) for token in ids]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        back = tokenizer.encode(text, add_special_tokens=False).ids
        if back == ids:
            continue
        at = next((i for i, (x, y) in enumerate(zip(ids, back)) if x != y), min(len(ids), len(back)))
        failures.append(f"sequence {index}: position {at} is {_token(tokenizer, ids, at)}, after decode -> encode "
                        f"{_token(tokenizer, back, at)} ({len(ids)} ids became {len(back)})")
    if len(failures) > limit:
        failures = failures[:limit] + [f"... and {len(failures) - limit} more sequences"]
    return failures
