"""The fixed, seeded batch of sequences both sides of a parity check score: text of the model's synthetic language.

Each sequence is the next `length` tokens of the language's packed document stream (documents run across
sequence edges, as in pretraining); its first half is the prompt and the rest the response whose log-probs
are compared. Lengths run from below the bundled models' sliding windows to several windows past them, so
a difference in windowed attention shows up in the batch.
"""

import hashlib
import json
from dataclasses import dataclass

from rlparity.models import Language, load_spec

# The stream seed of parity batches: the bundled models trained on data_seed 1 and were evaluated on
# eval_seed 2 (fixtures/models/*.json), so 5 is text neither has seen.
PARITY_SEED = 5
# tiny slides over 32 tokens: lengths below, at and past the window edge, up to six windows.
PARITY_LENGTHS = (20, 33, 48, 64, 96, 128, 160, 200)
PROMPT_FRACTION = 0.5
# The engines' max length for parity batches (the longest is 200 tokens); vLLM sizes its KV cache by it.
PARITY_MAX_LEN = 512


@dataclass(frozen=True)
class ParityBatch:
    model: str
    seed: int
    token_ids: list[list[int]]
    prompt_len: list[int]

    @property
    def lengths(self) -> list[int]:
        return [len(sequence) for sequence in self.token_ids]

    @property
    def response_tokens(self) -> int:
        return sum(n - p for n, p in zip(self.lengths, self.prompt_len))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.token_ids, self.prompt_len]).encode()).hexdigest()

    def describe(self) -> dict:
        return {"model": self.model, "seed": self.seed, "lengths": self.lengths, "prompt_len": self.prompt_len,
                "response_tokens": self.response_tokens, "token_ids_sha256": self.sha256}

    def label(self) -> str:
        return f"{self.model}:seed{self.seed}:{len(self.token_ids)}seqs:{self.response_tokens}tok"


def language_tokens(model: str, seed: int, lengths) -> list[list[int]]:
    """Consecutive blocks of the bundled model's synthetic language stream, one per length."""
    spec = load_spec(model)
    stream = Language(spec.config["vocab_size"], spec.language_seed).token_stream(seed)
    return [[next(stream) for _ in range(n)] for n in lengths]


def parity_batch(model: str = "tiny", lengths=PARITY_LENGTHS, seed: int = PARITY_SEED) -> ParityBatch:
    token_ids = language_tokens(model, seed, lengths)
    prompt_len = [max(1, int(len(sequence) * PROMPT_FRACTION)) for sequence in token_ids]
    return ParityBatch(model=model, seed=seed, token_ids=token_ids, prompt_len=prompt_len)
