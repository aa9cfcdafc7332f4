"""The engine protocol: log-prob producers compared on the same tokens.

    logprobs(token_ids, prompt_len, sampling) -> per-token log-probs of the response tokens

Teacher forcing: sequence i is token_ids[i]; its first prompt_len[i] tokens are the prompt, and the
result for it is a 1-D tensor with log p(token_t | tokens_<t) for t = prompt_len[i] .. len - 1.
`sampling` says which distribution the log-probs are of (see Sampling).

Optional capabilities, each a protocol of its own:
    routing(token_ids) -> Routing              the experts each token was sent to, per layer
    hidden_states(token_ids) -> {name: tensor}  activations at the capture points, per layer
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from rlparity.errors import RlparityError
from rlparity.models.tokenizer_info import TokenizerInfo, require_same_tokenizer

LOGPROB_MODES = ("raw", "processed")


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
        if not self.temperature > 0:
            raise RlparityError(f"Sampling.temperature must be > 0, got {self.temperature} (greedy decoding has no "
                                "sampling distribution to report log-probs of)")
        if not 0 < self.top_p <= 1:
            raise RlparityError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RlparityError(f"Sampling.top_k must be >= 0 (0 = off), got {self.top_k}")


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
                  vocab_size: int) -> None:
    """Rejects a logprobs request an engine cannot answer, naming the sequence and what was wrong."""
    if isinstance(prompt_len, int) or len(prompt_len) != len(token_ids):
        got = prompt_len if isinstance(prompt_len, int) else f"{len(prompt_len)} prompt lengths"
        raise RlparityError(f"{engine}: expected one prompt length per sequence ({len(token_ids)}), got {got}")
    for i, (sequence, prompt) in enumerate(zip(token_ids, prompt_len)):
        check_sequence(engine, sequence, max_len, vocab_size, where=f"sequence {i}")
        if not 1 <= prompt < len(sequence):
            raise RlparityError(f"{engine}: sequence {i} has {len(sequence)} tokens and prompt_len {prompt}; expected "
                                f"1 <= prompt_len < {len(sequence)} (the first token has no log-prob, and at least one "
                                f"response token is needed)")


def check_sequence(engine: str, sequence: Sequence[int], max_len: int, vocab_size: int,
                   where: str = "the sequence") -> None:
    if len(sequence) == 0:
        raise RlparityError(f"{engine}: {where} is empty")
    if len(sequence) > max_len:
        raise RlparityError(
            f"{engine}: {where} has {len(sequence)} tokens, more than the engine's max length {max_len}")
    low, high = min(sequence), max(sequence)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise RlparityError(f"{engine}: {where} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


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
