"""The measured workloads, each run under any meter: one decoder layer, the log-prob pass, a training step.

Each runs the forward in phase "forward" and the backward in phase "backward" (and the optimizer in
"optimizer"), with parameters adopted as weights and inputs as inputs, so that what a meter reports
under activations.* is exactly what the workload's forward left for its backward. The upstream
gradients are uninitialised tensors of the outputs' shapes: memory does not depend on their values.
"""

import torch

from rlparity.errors import RlparityError
from rlparity.memory.meter import Meter
from rlparity.memory.report import (
    BACKWARD_PHASE,
    FORWARD_PHASE,
    INPUTS,
    OPTIMIZER_PHASE,
    OPTIMIZER_STATE,
    WEIGHTS,
    MemoryReport,
)
from rlparity.ops.logprobs import logprobs_and_entropy, naive_logprobs_and_entropy

LOGPROB_KIND = "logprob"
# The RL loss's entropy bonus: any non-zero coefficient makes the entropy's backward run; its value is irrelevant.
ENTROPY_COEFFICIENT = 1e-3
ROUTER_STD = 1.0  # random routers with logits of order one: distinct top-k choices, every expert in use


def logprobs(hidden, weight, targets, chunk: int | None):
    """The chunked log-prob pass, or the naive full-vocabulary one when chunk is None."""
    if chunk is None:
        return naive_logprobs_and_entropy(hidden, weight, targets)
    return logprobs_and_entropy(hidden, weight, targets, chunk)


def eager_mask(tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An additive [1, 1, T, T] mask of the size transformers' eager attention adds to its scores."""
    return torch.zeros(1, 1, tokens, tokens, dtype=dtype, device=device)


def seeded_like(like: torch.Tensor, shape) -> torch.Tensor:
    """Seeded normal values of `like`'s dtype and device. Not torch.empty: uninitialised memory may hold NaN or inf,
    which the attention contract refuses, so a memory check's verdict would depend on what memory held."""
    if like.device.type == "meta":  # shapes only: there are no values to draw
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    generator = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


def layer_step(meter: Meter, layer: torch.nn.Module, position_embeddings, tokens: int,
               attention_mask: torch.Tensor | None = None) -> MemoryReport:
    """Forward and backward of one decoder layer on [1, tokens, hidden] (its input requiring grad)."""
    parameter = next(layer.parameters())
    hidden = seeded_like(parameter, (1, tokens, layer.hidden_size)).requires_grad_()
    with meter, meter.watch(layer):
        meter.adopt(layer.parameters(), WEIGHTS)
        meter.adopt([hidden, *position_embeddings], INPUTS)
        if attention_mask is not None:
            meter.adopt([attention_mask], INPUTS)
        with meter.phase(FORWARD_PHASE):
            out = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings)
        with meter.phase(BACKWARD_PHASE):
            out.backward(seeded_like(out, out.shape))
            del out
    return meter.report()


def layer_eval_forward(meter: Meter, layer: torch.nn.Module, position_embeddings, tokens: int) -> MemoryReport:
    """One decoder layer's forward without autograd, as log-probs are recomputed in eval mode."""
    parameter = next(layer.parameters())
    hidden = seeded_like(parameter, (1, tokens, layer.hidden_size))
    with meter, meter.watch(layer), torch.no_grad():
        meter.adopt(layer.parameters(), WEIGHTS)
        meter.adopt([hidden, *position_embeddings], INPUTS)
        with meter.phase(FORWARD_PHASE):
            layer(hidden, position_embeddings=position_embeddings)
    return meter.report()


def logprob_step(meter: Meter, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk: int | None) -> MemoryReport:
    """Forward and backward of the log-prob pass; `hidden` [T, H] and `weight` [V, H] require grad."""
    with meter, meter.watch_gradients([weight]):
        meter.adopt([weight], WEIGHTS)
        meter.adopt([hidden, targets], INPUTS)
        with meter.phase(FORWARD_PHASE), meter.module(LOGPROB_KIND):
            logp, entropy = logprobs(hidden, weight, targets, chunk)
            meter.tag_graph((logp, entropy), hidden, LOGPROB_KIND)
        with meter.phase(BACKWARD_PHASE):
            gradients = [seeded_like(logp, logp.shape), seeded_like(entropy, entropy.shape)]
            torch.autograd.backward([logp, entropy], gradients)
            del gradients
            del logp, entropy
    return meter.report()


def policy_loss(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """A policy-gradient loss with advantages of one and an entropy bonus: the shape of an RL step's loss."""
    return -logp.mean() - ENTROPY_COEFFICIENT * entropy.mean()


def train_step(meter: Meter, model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               chunk: int | None) -> MemoryReport:
    """One RL training step of a GptOssForCausalLM on `input_ids` [1, T], measured in steady state.

    The optimizer must have stepped once already, so that its state exists before the step, as it does in
    every step after the first. Gradients are set to None before the forward.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise RlparityError(f"train_step: expected input_ids of shape [1, T], got {tuple(input_ids.shape)}")
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if not state:
        raise RlparityError("train_step: the optimizer has no state yet; step it once before measuring, so the "
                            "measured step is a steady-state one")
    optimizer.zero_grad(set_to_none=True)
    targets = input_ids[0, 1:]
    with meter, meter.watch(model):
        meter.adopt(model.parameters(), WEIGHTS)
        meter.adopt(state, OPTIMIZER_STATE)
        meter.adopt([input_ids], INPUTS)
        with meter.phase(FORWARD_PHASE):
            hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
            with meter.module(LOGPROB_KIND):
                loss = policy_loss(*logprobs(hidden, model.lm_head.weight, targets, chunk))
            meter.tag_graph(loss, hidden, LOGPROB_KIND)
            del hidden
        with meter.phase(BACKWARD_PHASE):
            loss.backward()
            del loss
        with meter.phase(OPTIMIZER_PHASE):
            optimizer.step()
    return meter.report()


def random_model(config: dict, *, attention: str, experts: str, dtype: torch.dtype, seed: int = 0):
    """A GptOssForCausalLM of `config` with seeded random weights and routers, on CPU, in `dtype`.

    attention and experts as rlparity.memory.fake.gpt_oss_config takes them.
    """
    from transformers import GptOssForCausalLM

    from rlparity.memory.fake import gpt_oss_config

    torch.manual_seed(seed)
    model = GptOssForCausalLM(gpt_oss_config(config, attention=attention, experts=experts)).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("router.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * ROUTER_STD)
    return model
