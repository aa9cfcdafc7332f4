"""rlparity's own GPT-OSS forward (rlparity.reference.gpt_oss) in float64, on the same checkpoint.

Each sequence runs alone (no padding), so nothing about batching can enter the ground truth.
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines.base import RAW, Routing, Sampling, check_request, check_sequence, engine_max_len
from rlparity.engines.sampling import token_logprobs
from rlparity.models.checkpoint import open_checkpoint
from rlparity.reference.gpt_oss import GptOssOutput, forward

# The dense reference materialises [heads, S, S] attention scores per layer: at 4096 tokens and 8 heads
# that is 1 GiB in float64, about what a 24 GiB development machine can spare beside the rest.
REFERENCE_MAX_LEN = 4096


class ReferenceEngine:
    def __init__(self, checkpoint: Path | str, *, dtype: torch.dtype = torch.float64, max_len: int | None = None,
                 tokenizer: Path | str | None = None):
        opened = open_checkpoint(checkpoint, tokenizer)
        self.dtype = dtype
        self.name = f"reference[{str(dtype).removeprefix('torch.')}]"
        self.checkpoint, self.config, self.tokenizer = opened.path, opened.config, opened.tokenizer
        self.max_len = engine_max_len(self.name, max_len or min(REFERENCE_MAX_LEN, opened.max_position_embeddings),
                                      opened.max_position_embeddings, opened.path)
        self.weights = opened.weights(dtype)

    def close(self) -> None:
        self.weights = {}

    def _run(self, token_ids: Sequence[int]) -> GptOssOutput:
        with torch.no_grad():
            return forward(self.config, self.weights, torch.tensor([list(token_ids)]))

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]:
        token_ids = check_request(self.name, token_ids, prompt_len, self.max_len, self.config["vocab_size"])
        return [token_logprobs(self._run(sequence).logits[0], torch.tensor(list(sequence)), prompt, sampling)
                for sequence, prompt in zip(token_ids, prompt_len)]

    def routing(self, token_ids: Sequence[int]) -> Routing:
        token_ids = check_sequence(self.name, token_ids, self.max_len, self.config["vocab_size"])
        out = self._run(token_ids)
        return Routing(expert_ids=out.expert_ids, router_logits=out.router_logits)

    def hidden_states(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        token_ids = check_sequence(self.name, token_ids, self.max_len, self.config["vocab_size"])
        return {name: activation[0] for name, activation in self._run(token_ids).activations.items()}
