"""The trainer's forward pass on a right-padded batch: per-sequence log-probs and the routes taken.

    rollout pass (verl's old_log_prob):  model.eval(), no gradients
    training pass (verl's update):       model.train(), gradients on

Both read the same batch layout as rlparity's hf engine: sequences right-padded with the pad id and
masked out, logits upcast to float32 before the log-softmax.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlparity.engines.base import Routing, right_pad
from rlparity.errors import RlparityError
from rlparity.routing.capture import RouterCapture


@dataclass
class Pass:
    logprobs: list[torch.Tensor]  # per sequence [S_i - 1]: log p(token_t | tokens_<t), t >= 1; float32
    routing: list[Routing]  # per sequence: expert ids [S_i, k] the experts ran, router logits [S_i, E], per layer


def pad_batch(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, S], attention mask [B, S]), right-padded to the longest sequence."""
    if not token_ids or any(len(sequence) < 2 for sequence in token_ids):
        raise RlparityError(f"routing: expected at least one sequence, each of >= 2 tokens (one log-prob); got "
                            f"lengths {[len(sequence) for sequence in token_ids]}")
    return right_pad(token_ids, pad_id)


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """logits [B, S, V], ids [B, S] -> per sequence [S_i - 1], float32."""
    out = []
    for row, length in enumerate(lengths):
        logprobs = torch.log_softmax(logits[row, : length - 1].float(), dim=-1)  # position t - 1 predicts token t
        out.append(logprobs.gather(-1, ids[row, 1:length, None]).squeeze(-1))
    return out


def run_pass(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, *, train: bool,
             grad: bool) -> Pass:
    """One forward over the batch, in train or eval mode, with or without autograd; restores the mode."""
    device = next(model.parameters()).device
    ids, mask = (tensor.to(device) for tensor in pad_batch(token_ids, pad_id))
    lengths = [len(sequence) for sequence in token_ids]
    was_training = model.training
    model.train(train)
    try:
        with RouterCapture(model) as capture, torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return Pass(sequence_logprobs(logits, ids, lengths), capture.sequences(lengths, ids.shape[1]))
    finally:
        model.train(was_training)
