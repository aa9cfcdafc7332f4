"""The fixed batch of sequences both sides of a parity check score.

A bundled model's batch is seeded text of its synthetic language: each sequence is the next `length` tokens of the
language's packed document stream (documents run across sequence edges, as in pretraining); its first half is the
prompt and the rest the response whose log-probs are compared. Lengths run from below the bundled models' sliding
windows to several windows past them, so a difference in windowed attention shows up in the batch.

A user's checkpoint's batch is the prompt set shipped in fixtures/prompts (plain-text prompts and responses; its
README says why those lengths), tokenized by the checkpoint's own tokenizer: the prompt's token count is the split,
and each sequence is clipped to what the model and every engine accept.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.model_option import ModelSource, as_source
from rlparity.models import Language, checkpoint_config, load_spec
from rlparity.models.specs import models_dir

# The stream seed of parity batches: the bundled models trained on data_seed 1 and were evaluated on
# eval_seed 2 (fixtures/models/*.json), so 5 is text neither has seen.
PARITY_SEED = 5
# tiny slides over 32 tokens: lengths below, at and past the window edge, up to six windows.
PARITY_LENGTHS = (20, 33, 48, 64, 96, 128, 160, 200)
PROMPT_FRACTION = 0.5
# The engines' max length for parity batches (the longest is 200 tokens); vLLM sizes its KV cache by it.
PARITY_MAX_LEN = 512
PROMPTS_FILE = "parity_prompts.json"
# A checkpoint's sequences are clipped here: the prompt set's longest text is ~550 tokens in a word-level or
# GPT-OSS-like tokenizer, so only a much finer tokenizer (bytes, characters) is cut.
PROMPT_SET_MAX_TOKENS = 1024


@dataclass(frozen=True)
class ParityBatch:
    model: str
    seed: int
    token_ids: list[list[int]]
    prompt_len: list[int]
    prompts: str | None = None  # the prompt set (file and sha256 prefix) a checkpoint's batch was tokenized from
    model_argument: str = ""  # how a command line names the model: "--model tiny", "--checkpoint DIR"
    max_len: int = PARITY_MAX_LEN  # the engines' max length for this batch

    @property
    def lengths(self) -> list[int]:
        return [len(sequence) for sequence in self.token_ids]

    @property
    def response_tokens(self) -> int:
        return sum(n - p for n, p in zip(self.lengths, self.prompt_len))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.token_ids, self.prompt_len]).encode()).hexdigest()

    @property
    def model_option(self) -> str:
        return self.model_argument or f"--model {self.model}"

    def describe(self) -> dict:
        described = {"model": self.model, "seed": self.seed, "lengths": self.lengths, "prompt_len": self.prompt_len,
                     "response_tokens": self.response_tokens, "token_ids_sha256": self.sha256}
        return described | ({"prompts": self.prompts} if self.prompts else {})

    def label(self) -> str:
        origin = self.prompts.partition("@")[0] if self.prompts else f"seed{self.seed}"
        return f"{self.model}:{origin}:{len(self.token_ids)}seqs:{self.response_tokens}tok"


def language_tokens(model: str, seed: int, lengths) -> list[list[int]]:
    """Consecutive blocks of the bundled model's synthetic language stream, one per length."""
    spec = load_spec(model)
    stream = Language(spec.config["vocab_size"], spec.language_seed).token_stream(seed)
    return [[next(stream) for _ in range(n)] for n in lengths]


def parity_batch(model: "ModelSource | str" = "tiny", lengths=PARITY_LENGTHS, seed: int = PARITY_SEED
                 ) -> ParityBatch:
    """A bundled model's synthetic-language batch (of `lengths`, from `seed`), or a checkpoint's prompt-set batch."""
    source = as_source(model)
    if source.checkpoint is not None:
        return prompt_set_batch(source)
    token_ids = language_tokens(source.name, seed, lengths)
    prompt_len = [max(1, int(len(sequence) * PROMPT_FRACTION)) for sequence in token_ids]
    return ParityBatch(model=source.name, seed=seed, token_ids=token_ids, prompt_len=prompt_len,
                       model_argument=source.argument)


def prompts_path() -> Path:
    return models_dir().parent / "prompts" / PROMPTS_FILE


def prompt_set() -> tuple[list[dict], str, str]:
    """(prompts, the separator between prompt and response, the file's sha256)."""
    path = prompts_path()
    if not path.is_file():
        raise RlparityError(f"the parity prompt set is not at {path}: it ships in the package (rlparity/fixtures)")
    raw = path.read_bytes()
    table = json.loads(raw)
    return table["prompts"], table["separator"], hashlib.sha256(raw).hexdigest()


def prompt_set_batch(source: ModelSource, max_tokens: int = PROMPT_SET_MAX_TOKENS) -> ParityBatch:
    """The prompt set tokenized by the checkpoint's tokenizer (no special tokens, no chat template): each sequence is
    prompt + separator + response, its prompt length the prompt's own token count; clipped to one token less than
    max_position_embeddings (vLLM scores a sequence by generating one more token) and to `max_tokens`."""
    from rlparity.parity.tokens import load_tokenizer

    folder = source.checkpoint
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    limit = min(checkpoint_config(folder)["max_position_embeddings"] - 1, max_tokens)
    prompts, separator, digest = prompt_set()
    token_ids, prompt_len = [], []
    for entry in prompts:
        prompt = tokenizer.encode(entry["prompt"], add_special_tokens=False).ids
        ids = tokenizer.encode(entry["prompt"] + separator + entry["response"], add_special_tokens=False).ids[:limit]
        if len(ids) < 2 or not prompt:
            raise RlparityError(f"{folder / 'tokenizer.json'} turns prompt {entry['id']!r} of {prompts_path()} into "
                                f"{len(ids)} tokens (prompt {len(prompt)}), clipped to {limit}; a parity sequence "
                                f"needs a prompt token and a response token")
        token_ids.append(ids)
        prompt_len.append(min(len(prompt), len(ids) - 1))
    return ParityBatch(model=source.label, seed=0, token_ids=token_ids, prompt_len=prompt_len,
                       prompts=f"{PROMPTS_FILE}@{digest[:12]}", model_argument=source.argument,
                       max_len=max(len(ids) for ids in token_ids))
