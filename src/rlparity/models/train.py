"""Seeded initialisation and a short deterministic pretraining run on the synthetic language.

transformers' own initialisation draws from the global RNG in module order and leaves some tensors to
defaults that change between versions, so parameters are initialised here by name, from one seeded
generator. Training runs on one thread with deterministic algorithms, so on a given machine and
software stack the same recipe gives bitwise the same weights.
"""

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlparity.models.language import Language

INIT_STD = 0.02  # GPT-2's initialiser, which transformers' GPT-OSS also uses (initializer_range)
SINK_INIT_STD = 1.0  # sinks start spread out, so every head does not begin at the same logit


@dataclass(frozen=True)
class TrainingRecipe:
    seed: int  # parameter initialisation
    data_seed: int  # training document stream
    eval_seed: int  # held-out documents for the statistics
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup_steps: int
    final_lr_fraction: float  # cosine decay ends at lr * this
    betas: tuple[float, float]
    weight_decay: float  # AdamW's, on matrices and embeddings only (not on biases, norms or sinks)
    grad_clip: float
    router_aux_loss_coef: float  # weight of transformers' load-balancing loss (pushes toward even expert load)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingRecipe":
        return cls(**{**values, "betas": tuple(values["betas"])})


def init_parameters(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            elif name.endswith("sinks"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * SINK_INIT_STD)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * INIT_STD)


def learning_rate(step: int, recipe: TrainingRecipe) -> float:
    """Linear warmup, then cosine decay to final_lr_fraction * lr."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.final_lr_fraction
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def deterministic_cpu():
    """One thread and deterministic kernels for the duration; the caller's settings are restored after."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def train(model: torch.nn.Module, language: Language, recipe: TrainingRecipe,
          log: Callable[[str], None] = print) -> list[float]:
    """Trains in place (fp32, CPU) on the packed document stream; returns the loss of every step."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if name.endswith(("bias", "norm.weight", "sinks")) else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=recipe.betas,
    )
    model.train()
    losses = []
    start = time.monotonic()
    for step, batch in zip(range(recipe.steps), language.batches(recipe.data_seed, recipe.batch, recipe.seq_len)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        input_ids = torch.tensor(batch)
        out = model(input_ids=input_ids, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        loss = lm_loss + recipe.router_aux_loss_coef * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(lm_loss.item())
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"step {step:4d}/{recipe.steps}  lm loss {losses[-1]:.3f}  {time.monotonic() - start:.0f}s")
    model.eval()
    return losses
