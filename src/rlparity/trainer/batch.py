"""Episodes as training tensors, and the per-token log-probs of the trained tokens under a model."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlparity.engines.base import right_pad
from rlparity.ops.logprobs import logprobs_and_entropy
from rlparity.trainer.rollout import Trajectory


@dataclass
class Batch:
    ids: torch.Tensor  # [N, L] right-padded
    attention: torch.Tensor  # [N, L]
    trained: torch.Tensor  # [N, L - 1] bool: target position t + 1 is an agent token (position t predicts it)
    rollout_logprobs: torch.Tensor  # [T]: the engine's log-probs of the trained tokens, in row-major order
    rewards: torch.Tensor  # [N]
    lengths: list[int]

    @property
    def token_rows(self) -> torch.Tensor:
        """[T]: the sequence each trained token belongs to."""
        return self.trained.nonzero()[:, 0]

    def select(self, rows: Sequence[int]) -> "Batch":
        rows_t = torch.tensor(list(rows))
        token_rows = self.token_rows
        keep = torch.isin(token_rows, rows_t)
        # tokens stay in row-major order only if rows are taken in increasing order
        ordered = sorted(rows)
        return Batch(self.ids[ordered], self.attention[ordered], self.trained[ordered],
                     self.rollout_logprobs[keep], self.rewards[ordered], [self.lengths[i] for i in ordered])


def make_batch(episodes: Sequence[Trajectory], pad_id: int) -> Batch:
    ids, attention = right_pad([e.token_ids for e in episodes], pad_id)
    trained = torch.zeros(ids.shape, dtype=torch.bool)
    rollout = torch.zeros(ids.shape, dtype=torch.float32)
    for row, episode in enumerate(episodes):
        trained[row, : len(episode.agent_mask)] = torch.tensor(episode.agent_mask)
        rollout[row, : len(episode.rollout_logprobs)] = torch.tensor(episode.rollout_logprobs)
    return Batch(ids, attention, trained[:, 1:], rollout[:, 1:][trained[:, 1:]],
                 torch.tensor([e.reward for e in episodes], dtype=torch.float32), [len(e.token_ids) for e in episodes])


def token_logprobs(model: torch.nn.Module, batch: Batch, chunk_size: int,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [T], entropy [T]) of the trained tokens; differentiable when run with gradients enabled."""
    hidden = model.model(input_ids=batch.ids, attention_mask=batch.attention).last_hidden_state  # [N, L, H]
    rows = hidden[:, :-1][batch.trained]  # [T, H]: the position before each trained token
    targets = batch.ids[:, 1:][batch.trained]
    return logprobs_and_entropy(rows, model.lm_head.weight, targets, chunk_size, temperature=temperature)
