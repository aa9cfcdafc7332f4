"""Closed-form memory of a GPT-OSS RL training step per rank, phase by phase.

Inputs: the model config, T tokens per rank in the micro-batch (after Ulysses sequence parallelism,
which divides the sequence by its degree), the FSDP world size W, the compute dtype (b bytes), the
attention path, the log-prob chunk C, activation checkpointing on or off. Notation as in
rlparity.memory.dims (parameter counts P) and rlparity.memory.footprints (per-module bytes: saved A_m,
forward extra F_m, backward extra B_m, gradients G_m, in forward order norm, attention, norm, router,
experts; A_layer = sum of A_m).

Static state (m: bytes of FSDP's sharded master dtype, float32 by default; without FSDP everything is in
the compute dtype and W = 1):
    weights           m P / W
    gradients         m P / W            FSDP reduce-scatters into the sharded gradient
    optimizer_state   2 m P / W + 4 n    AdamW's moments; n parameter tensors' float32 step counts
    fsdp_gather       b (P_root + 2 P_layer)  the root unit stays gathered; the next layer is prefetched
                      + (b + 4) P_layer       in the backward: one layer's unsharded gradient and its
                                              float32 copy for the reduce-scatter
Kept until the backward: per layer A_layer (with checkpointing only its input, b T H), the final norm,
cos and sin (b T D), the log-prob pass's saved tensors.

Phase peaks, on top of weights + optimizer state (+ gather buffers) + input ids:
    forward    the last layer's modules in turn: A of everything before them, the embedding's output and
               the layer's input (b T H each), the residual sum once attention has run, and A_m + F_m;
               then the final norm; then the log-prob pass (the model has returned: the embedding's
               output is gone)
    backward   the log-prob pass: everything kept, the log-prob's B; then layers last to first, modules
               in reverse: the saved tensors of modules not yet done, the gradients of modules and
               layers done, the incoming gradient (b T H; twice between the residual sum and the
               layer's input), B_m. That is linear in the layer index, so the first and the last layer
               bound every other. With checkpointing, a layer's A_layer reappears in its backward.
               Finally the embedding's gradient (b V H).
    optimizer  the gradients, and AdamW's temporaries: one state-sized buffer (multi-tensor, CUDA's
               default) or two of the largest parameter (per tensor, CPU's default)

Validated, per category and per phase peak, against rlparity.memory.tracker: a training step of the
bundled tiny and micro models on CPU, one decoder layer and the log-prob pass at GPT-OSS-20B/120B size
on the meta device. The FSDP terms are not measured on CPU (there is no FSDP there); the gpu-marked
conformance test measures one layer on CUDA.
"""

import math
from dataclasses import dataclass, field

import torch

from rlparity.errors import RlparityError
from rlparity.memory import footprints
from rlparity.memory.dims import (
    FP32_BYTES,
    INT_BYTES,
    Dims,
    check_compute_dtype,
    dtype_bytes,
    largest_parameter,
    layer_parameters,
    parameter_tensors,
    parameters,
    root_parameters,
)
from rlparity.memory.footprints import LAYER_ATTENTION, Footprint


@dataclass
class Estimate:
    """Bytes per category (named as rlparity.memory.report names them) and the peak of each phase."""

    categories: dict[str, int] = field(default_factory=dict)
    phase_peak: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.phase_peak.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peak, key=self.phase_peak.get)

    def saved_activations(self) -> dict[str, int]:
        prefix = "activations."
        return {k[len(prefix):]: v for k, v in self.categories.items() if k.startswith(prefix)}


def _forward_peak(modules: list[Footprint], before: int, stream: int) -> int:
    """Most bytes live while a layer's modules run forward on top of `before`."""
    peak, saved = 0, 0
    for index, module in enumerate(modules):
        residual_sum = stream if index > LAYER_ATTENTION else 0
        peak = max(peak, before + saved + residual_sum + module.saved + module.forward_extra)
        saved += module.saved
    return peak


def _backward_peak(modules: list[Footprint], before: int, stream: int) -> int:
    """Most bytes live while a layer's modules run backward, last first, on top of `before`."""
    peak, grads = 0, 0
    remaining = sum(m.saved for m in modules)
    for index in range(len(modules) - 1, -1, -1):
        module = modules[index]
        residual_grad = stream if index <= LAYER_ATTENTION else 0
        peak = max(peak, before + remaining + grads + residual_grad + module.backward_extra)
        remaining -= module.saved
        grads += module.gradients
    return peak


def layer_step_estimate(config: dict, tokens: int, dtype: torch.dtype, attention: str) -> Estimate:
    """rlparity.memory.steps.layer_step: one decoder layer forward and backward on [1, T, H]."""
    d, b, t = Dims.of(config), check_compute_dtype(dtype), tokens
    modules = footprints.layer(d, t, b, attention)
    weights = b * layer_parameters(d)
    mask = b * t * t if attention == "eager" else 0
    inputs = b * t * d.hidden + b * t * d.head_dim + mask  # x, cos and sin, the eager mask
    stream = b * t * d.hidden  # the layer's output, its gradient
    saved = footprints.layer_saved(d, t, b, attention)
    forward = max(_forward_peak(modules, weights + inputs, stream), weights + inputs + sum(saved.values()) + 2 * stream)
    backward = _backward_peak(modules, weights + inputs + 2 * stream, stream)
    categories = {"weights": weights, "inputs": inputs, "gradients": sum(m.gradients for m in modules)}
    categories |= {f"activations.{kind}": count for kind, count in saved.items()}
    return Estimate(categories, {"forward": forward, "backward": backward})


def logprob_step_estimate(config: dict, tokens: int, dtype: torch.dtype, chunk: int | None) -> Estimate:
    """rlparity.memory.steps.logprob_step: the log-prob pass forward and backward, outputs held by the caller."""
    d, b, t = Dims.of(config), check_compute_dtype(dtype), tokens
    module = footprints.logprob(d, t, b, chunk)
    weights = b * d.vocab * d.hidden
    inputs = b * t * d.hidden + INT_BYTES * t
    outputs = FP32_BYTES * t if chunk is not None else 2 * FP32_BYTES * t  # the chunked pass saves the entropy
    upstream = 2 * FP32_BYTES * t
    forward = weights + inputs + module.saved + module.forward_extra
    backward = weights + inputs + module.saved + outputs + upstream + module.backward_extra
    categories = {"weights": weights, "inputs": inputs, "gradients": module.gradients,
                  "activations.logprob": module.saved + outputs}
    return Estimate(categories, {"forward": forward, "backward": backward})


@dataclass(frozen=True)
class Workload:
    """One RL training step per rank (rlparity.memory.steps.train_step), at any size."""

    config: dict
    tokens: int  # per rank and micro-batch, after sequence parallelism
    dtype: torch.dtype = torch.bfloat16  # compute dtype
    attention: str = "triton"  # one of rlparity.memory.footprints.ATTENTION_PATHS
    logprob_chunk: int | None = 1024  # None: the naive full-vocabulary log-prob pass
    world: int = 1  # FSDP2 shards parameters, gradients and optimizer state over this many ranks; 1: no FSDP
    master_dtype: torch.dtype = torch.float32  # FSDP's sharded parameters, gradients and AdamW state
    checkpointing: bool = False  # activation checkpointing of every decoder layer
    optimizer_foreach: bool = True  # AdamW's multi-tensor path (CUDA's default); False: per tensor (CPU's)


def _static(workload: Workload, d: Dims, b: int) -> dict[str, int]:
    shard = math.ceil(parameters(d) / workload.world)
    m = dtype_bytes(workload.master_dtype) if workload.world > 1 else b
    return {"weights": m * shard, "gradients": m * shard,
            "optimizer_state": 2 * m * shard + FP32_BYTES * parameter_tensors(d)}


def estimate(workload: Workload) -> Estimate:
    """Per-rank bytes by category and the peak of each phase of one steady-state RL training step."""
    d, b, t = Dims.of(workload.config), check_compute_dtype(workload.dtype), workload.tokens
    if t < 2 or workload.world < 1:
        raise RlparityError(f"expected at least 2 tokens and 1 rank, got tokens={t}, world={workload.world}")
    fsdp = workload.world > 1
    static = _static(workload, d, b)
    gradient_bytes = dtype_bytes(workload.master_dtype) / workload.world if fsdp else b  # per parameter, per rank
    layer_grads = int(gradient_bytes * layer_parameters(d))
    gather_forward = b * (root_parameters(d) + 2 * layer_parameters(d)) if fsdp else 0
    gather_backward = gather_forward + (b + FP32_BYTES) * layer_parameters(d) if fsdp else 0

    modules = footprints.layer(d, t, b, workload.attention)
    stream = b * t * d.hidden  # one [T, H] tensor of the residual stream, or its gradient
    kept_layer = stream if workload.checkpointing else sum(m.saved for m in modules)
    final_norm = footprints.norm(d, t, b)
    logprob = footprints.logprob(d, t - 1, b, workload.logprob_chunk)  # token i predicts token i + 1
    inputs = INT_BYTES * t
    rotary = b * t * d.head_dim
    persistent = static["weights"] + static["optimizer_state"] + inputs
    kept = d.layers * kept_layer + final_norm.saved

    base = persistent + gather_forward + rotary
    forward = max(
        _forward_peak(modules, base + stream + (d.layers - 1) * kept_layer + stream, stream),
        base + stream + d.layers * kept_layer + stream + final_norm.saved + final_norm.forward_extra,
        base + kept + logprob.saved + logprob.forward_extra,
    )

    base = persistent + gather_backward + rotary
    head_grads = int(gradient_bytes * (d.vocab * d.hidden + d.hidden))  # lm head and final norm, done first
    upstream = 2 * FP32_BYTES * (t - 1)  # the loss's gradients of the log-probs and entropies
    backward = max(base + kept + logprob.saved + upstream + logprob.backward_extra,
                   base + kept + head_grads + stream + final_norm.backward_extra)
    for index in (d.layers - 1, 0):
        below = base + index * kept_layer + head_grads + (d.layers - 1 - index) * layer_grads + stream
        if workload.checkpointing:  # the layer's input is still held while its forward is recomputed
            below += stream
            backward = max(backward, _forward_peak(modules, below, stream))
        backward = max(backward, _backward_peak(modules, below, stream))
    backward = max(backward, base + d.layers * layer_grads + head_grads + stream + b * d.vocab * d.hidden)

    state_bytes = dtype_bytes(workload.master_dtype) if fsdp else b
    temporaries = (state_bytes * math.ceil(parameters(d) / workload.world) if workload.optimizer_foreach
                   else 2 * state_bytes * math.ceil(largest_parameter(d) / workload.world))
    optimizer = persistent + static["gradients"] + temporaries

    categories = dict(static) | {"fsdp_gather": gather_backward, "inputs": inputs}
    per_layer = footprints.layer_saved(d, t, b, workload.attention)
    if workload.checkpointing:
        per_layer = {"checkpoint": stream}
    categories |= {f"activations.{kind}": d.layers * count for kind, count in per_layer.items()}
    categories["activations.norm"] = categories.get("activations.norm", 0) + final_norm.saved
    categories["activations.rotary"] = rotary
    categories["activations.logprob"] = logprob.saved + FP32_BYTES  # and the loss
    return Estimate(categories, {"forward": forward, "backward": backward, "optimizer": optimizer})
