"""The `hf` rollout engine: a copy of the policy in transformers, sampling a batch of turns at a time.

It holds its own weights, separate from the trainer's, so that weight sync is a real copy that can go
wrong and is verified (rlparity.trainer.sync). Sampling is plain ancestral sampling at the given
temperature over the full vocabulary; the log-probs returned are those of the distribution sampled
from, as vLLM's processed log-probs at top_p = 1, top_k = 0.
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines.base import Routing, right_pad
from rlparity.errors import RlparityError
from rlparity.routing.capture import RouterCapture
from rlparity.trainer.policy import load_policy


class HFSampler:
    def __init__(self, checkpoint: Path | str, temperature: float = 1.0):
        if not temperature > 0:
            raise RlparityError(f"hf sampler: temperature must be > 0, got {temperature}")
        self.model, self.pad_id = load_policy(checkpoint)
        self.model.eval()
        self.temperature = temperature
        self.name = "hf-sampler[eager,float32]"

    @torch.no_grad()
    def sample_turns(self, prefixes: Sequence[Sequence[int]], max_tokens: int, stop_ids: set[int],
                     seeds: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        """One turn per prefix, all prefixes in one right-padded batch per generated token (no KV cache: on
        CPU one batched forward of the whole batch costs less than a cached forward per sequence)."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        sequences = [list(prefix) for prefix in prefixes]
        turns: list[tuple[list[int], list[float]]] = [([], []) for _ in prefixes]
        active = list(range(len(prefixes)))
        for _ in range(max_tokens):
            if not active:
                break
            ids, mask = right_pad([sequences[i] for i in active], self.pad_id)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [N, L, V]
            last = logits[torch.arange(len(active)), mask.sum(dim=1) - 1].float()  # [N, V]
            logp = torch.log_softmax(last / self.temperature, dim=-1)
            still = []
            for row, i in enumerate(active):
                token = int(torch.multinomial(logp[row].exp(), 1, generator=generators[i]))
                sequences[i].append(token)
                turns[i][0].append(token)
                turns[i][1].append(logp[row, token].item())
                if token not in stop_ids:
                    still.append(i)
            active = still
        return turns

    @torch.no_grad()
    def routing(self, sequences: Sequence[Sequence[int]]) -> list[Routing]:
        ids, mask = right_pad(sequences, self.pad_id)
        with RouterCapture(self.model) as capture:
            self.model(input_ids=ids, attention_mask=mask)
        return capture.sequences([len(s) for s in sequences], ids.shape[1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights, strict=True)

    def close(self) -> None:
        self.model = None
