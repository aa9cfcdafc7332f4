"""The engine protocol: log-prob producers compared on the same tokens.

    logprobs(token_ids, prompt_len, sampling) -> per-token log-probs of the response tokens

Teacher forcing: sequence i is token_ids[i]; its first prompt_len[i] tokens are the prompt, and the
result for it is a 1-D tensor with log p(token_t | tokens_<t) for t = prompt_len[i] .. len - 1.
`sampling` says which distribution the log-probs are of (see Sampling).

Optional capabilities, each a protocol of its own:
    routing(token_ids) -> Routing              the experts each token was sent to, per layer
    hidden_states(token_ids) -> {name: tensor}  activations at the capture points, per layer
"""

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from rlparity.errors import RlparityError
from rlparity.models.tokenizer_info import TokenizerInfo, require_same_tokenizer

LOGPROB_MODES = ("raw", "processed")


def is_int(value) -> bool:
    """A Python or numpy integer; not a bool (True is no token id, prompt length or top_k)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Sampling:
    """What a log-prob means.

    raw: log-softmax of the model's logits; temperature, top_k and top_p are ignored (the trainer's view).
    processed: log-softmax of the distribution tokens are sampled from (vLLM's processed_logprobs):
        logits / temperature, then top-k (keep the k largest, ties with the k-th kept), then top-p (keep
        the smallest set of largest-probability tokens whose mass reaches top_p), renormalised; tokens
        outside get -inf.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    logprobs: Literal["raw", "processed"] = "raw"

    def __post_init__(self):
        if self.logprobs not in LOGPROB_MODES:
            raise RlparityError(f"Sampling.logprobs must be one of {LOGPROB_MODES}, got {self.logprobs!r}")
        if not is_real(self.temperature) or not 0 < self.temperature < math.inf:
            raise RlparityError(f"Sampling.temperature must be > 0 and finite, got {self.temperature!r} (greedy "
                                "decoding has no sampling distribution to report log-probs of)")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise RlparityError(f"Sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise RlparityError(f"Sampling.top_k must be >= 0 (0 = off) and an int, got {self.top_k!r}")


RAW = Sampling()


@dataclass
class Routing:
    """Per layer: expert_ids [S, k] in the router's order (largest logit first), router_logits [S, E] or None."""

    expert_ids: list[torch.Tensor]
    router_logits: list[torch.Tensor] | None = None


def capture_points(num_layers: int) -> list[str]:
    """Names of the activations `hidden_states` returns, in forward order.

    embed                 token embeddings [S, H]
    layers.{i}.attn       attention block output (after o_proj, before the residual add) [S, H]
    layers.{i}.mlp        MoE block output (before the residual add) [S, H]
    layers.{i}            the residual stream after layer i [S, H]
    norm                  final RMSNorm output [S, H]
    logits                [S, V]
    """
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.attn", f"layers.{i}.mlp", f"layers.{i}"]
    return names + ["norm", "logits"]


class Engine(Protocol):
    name: str  # says what it runs, e.g. "hf[eager,float32]"
    checkpoint: Path
    max_len: int  # longest sequence it accepts
    tokenizer: TokenizerInfo

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


@runtime_checkable
class RoutingEngine(Protocol):
    def routing(self, token_ids: Sequence[int]) -> Routing: ...


@runtime_checkable
class CaptureEngine(Protocol):
    def hidden_states(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]: ...


# Ask these, not isinstance(engine, CaptureEngine / RoutingEngine): from Python 3.12 isinstance on a
# runtime-checkable Protocol looks methods up statically, so it says no for an engine behind a proxy that
# forwards through __getattr__ (parity.sides.Guarded): seen on a Python 3.12 GPU machine, where every
# parity pair then failed its preflight.
def captures(engine) -> bool:
    """Whether `engine` reports its activations: hidden_states(token_ids), the CaptureEngine protocol."""
    return callable(getattr(engine, "hidden_states", None))


def routes(engine) -> bool:
    """Whether `engine` reports its MoE routes: routing(token_ids), the RoutingEngine protocol."""
    return callable(getattr(engine, "routing", None))


def process_versions(*engines) -> dict[str, dict]:
    """{engine name: package versions of its process} for the engines among `engines` that run in a process of
    their own (vLLM, SGLang: their worker reports them when it starts); for a Record's `engines`."""
    return {engine.name: dict(engine.info["versions"]) for engine in engines
            if isinstance(getattr(engine, "info", None), dict) and "versions" in engine.info}


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, L], attention mask [N, L]): the sequences right-padded with pad_id to the longest, L."""
    longest = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(list(sequence))
        mask[row, : len(sequence)] = 1
    return ids, mask


def check_request(engine: str, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int], max_len: int,
                  vocab_size: int) -> list[list[int]]:
    """The sequences as lists of ints, or an RlparityError naming the argument, the sequence and what was wrong."""
    if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 2:
        token_ids = list(token_ids)
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise RlparityError(f"{engine}: expected token_ids to be a list of sequences of token ids, got "
                            f"{type(token_ids).__name__}")
    if len(token_ids) == 0:
        raise RlparityError(f"{engine}: token_ids holds no sequences; expected at least one")
    if isinstance(prompt_len, torch.Tensor):
        prompt_len = prompt_len.tolist()
    is_list = isinstance(prompt_len, Sequence) and not isinstance(prompt_len, (str, bytes))
    if not is_list or len(prompt_len) != len(token_ids):
        got = f"{len(prompt_len)} prompt lengths" if is_list else repr(prompt_len)
        raise RlparityError(f"{engine}: expected one prompt length per sequence ({len(token_ids)}), got {got}")
    sequences = []
    for i, (sequence, prompt) in enumerate(zip(token_ids, prompt_len)):
        sequences.append(check_sequence(engine, sequence, max_len, vocab_size, where=f"sequence {i}"))
        length = len(sequences[-1])
        if not is_int(prompt) or not 1 <= prompt < length:
            raise RlparityError(f"{engine}: sequence {i} has {length} tokens and prompt_len {prompt!r}; expected "
                                f"1 <= prompt_len < {length}, an int (the first token has no log-prob, and at least "
                                f"one response token is needed)")
    return sequences


def check_raw_logprobs_request(engine: str, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                               sampling: Sampling, max_len: int, vocab_size: int, *,
                               processed_unavailable: str) -> list[list[int]]:
    """check_request for an engine whose teacher-forced log-probs are raw only (vLLM, SGLang): the sequences as int
    lists, or an RlparityError; `processed_unavailable` says why processed ones are not available."""
    sequences = check_request(engine, token_ids, prompt_len, max_len, vocab_size)
    if sampling.logprobs != "raw":
        raise RlparityError(f"{engine}: teacher-forced log-probs with Sampling(logprobs={sampling.logprobs!r}) "
                            f"are not available: {processed_unavailable}")
    return sequences


def check_sequence(engine: str, sequence: Sequence[int], max_len: int, vocab_size: int,
                   where: str = "the sequence") -> list[int]:
    """The sequence as a list of ints, or an RlparityError naming it and what was wrong."""
    if isinstance(sequence, torch.Tensor):
        if sequence.dim() != 1 or sequence.is_floating_point() or sequence.is_complex() or sequence.dtype == torch.bool:
            raise RlparityError(f"{engine}: {where} must hold integer token ids, got a {sequence.dtype} tensor of "
                                f"shape {tuple(sequence.shape)}")
        sequence = sequence.tolist()
    if isinstance(sequence, (str, bytes)) or not isinstance(sequence, Sequence):
        raise RlparityError(f"{engine}: {where} must be a sequence of token ids, got {type(sequence).__name__}")
    if len(sequence) == 0:
        raise RlparityError(f"{engine}: {where} is empty")
    if len(sequence) > max_len:
        raise RlparityError(
            f"{engine}: {where} has {len(sequence)} tokens, more than the engine's max length {max_len}")
    for token in sequence:
        if not is_int(token):
            raise RlparityError(f"{engine}: {where} holds {token!r} ({type(token).__name__}); token ids are ints")
    low, high = min(sequence), max(sequence)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise RlparityError(f"{engine}: {where} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return [int(token) for token in sequence]


def engine_max_len(engine: str, requested: int | None, model_max: int, source: Path) -> int:
    """The engine's max length: `requested`, which may not exceed the model's max_position_embeddings."""
    if requested is None:
        return model_max
    if not 0 < requested <= model_max:
        raise RlparityError(f"{engine}: max_len {requested} must be in [1, {model_max}] (max_position_embeddings of "
                            f"{source / 'config.json'})")
    return requested


def require_same_tokenizers(a: Engine, b: Engine) -> None:
    """Comparing two engines only makes sense if token ids mean the same tokens to both."""
    require_same_tokenizer(a.name, a.tokenizer, b.name, b.tokenizer)
