"""The phase table `rlparity memory` prints, and its --verify measurements on the meta device."""

import torch

from rlparity.errors import RlparityError
from rlparity.memory import analytic, footprints
from rlparity.memory.ceilings import CEILING_MARGIN, ceiling, compare
from rlparity.memory.dims import Dims, dtype_bytes, parameters
from rlparity.memory.report import format_bytes

ACTIVATION_ORDER = ("attention", "router", "experts", "norm", "rotary", "checkpoint", "logprob")
LABELS = {"checkpoint": "checkpointed layer inputs", "logprob": "log-prob pass"}
NOT_COUNTED = ("not counted: the CUDA context, communication buffers (NCCL), the caching allocator's "
               f"fragmentation; the ceiling adds {CEILING_MARGIN:.0%}, the tolerance the model is validated to")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(name: str, workload: analytic.Workload) -> str:
    d = Dims.of(workload.config)
    sharding = (f"FSDP over {workload.world} ranks ({_name(workload.master_dtype)} shards)" if workload.world > 1
                else "no FSDP")
    chunk = (f"log-probs in chunks of {workload.logprob_chunk}" if workload.logprob_chunk is not None
             else "full-vocabulary logits")
    checkpointing = "activation checkpointing" if workload.checkpointing else "no activation checkpointing"
    return (f"{name}: {parameters(d) / 1e9:.2f} B parameters ({d.layers} layers, {d.experts} experts top-{d.top_k}, "
            f"vocab {d.vocab:,}); {workload.tokens:,} tokens per rank; {sharding}; {_name(workload.dtype)} compute; "
            f"attention {workload.attention}; {chunk}; {checkpointing}")


def phase_table(workload: analytic.Workload, estimate: analytic.Estimate) -> list[tuple[str, int | None]]:
    """(row label, bytes; None for a heading): static state, activations kept for the backward, one layer's
    activations by module, then the peak of each phase."""
    c = estimate.categories
    rows = [("weights", c["weights"]), ("gradients", c["gradients"]), ("optimizer state (AdamW)", c["optimizer_state"]),
            ("FSDP gather buffers", c.get("fsdp_gather", 0)), ("activations kept for the backward", None)]
    kept = estimate.saved_activations()
    rows += [(f"  {LABELS.get(kind, kind)}", kept[kind]) for kind in ACTIVATION_ORDER if kind in kept]
    rows.append(("one layer (recomputed in its backward)" if workload.checkpointing else "one layer", None))
    d, b = Dims.of(workload.config), dtype_bytes(workload.dtype)
    rows += [(f"  {kind}", count) for kind, count in footprints.layer_saved(d, workload.tokens, b,
                                                                            workload.attention).items()]
    rows += [(f"peak in {phase}", count) for phase, count in estimate.phase_peak.items()]
    return rows


def print_table(workload: analytic.Workload, estimate: analytic.Estimate) -> int:
    """Prints the table; returns the ceiling."""
    rows = phase_table(workload, estimate)
    limit = ceiling(estimate.peak)
    width = max(len(label) for label, _ in rows) + 2
    print("per rank:")
    for label, count in rows:
        if count is None:
            print(f"  {label}")
            continue
        mark = "  <- peak" if label == f"peak in {estimate.peak_phase}" else ""
        print(f"  {label:<{width}}{format_bytes(count):>12}{mark}")
    print(f"  {f'ceiling (peak + {CEILING_MARGIN:.0%})':<{width}}{format_bytes(limit):>12}")
    print(NOT_COUNTED)
    return limit


def verify(workload: analytic.Workload) -> None:
    """Measures one decoder layer and the log-prob pass on the meta device and prints them against the estimate."""
    from rlparity.memory.fake import META, decoder_layer, gpt_oss_config, position_embeddings
    from rlparity.memory.steps import eager_mask, layer_step, logprob_step
    from rlparity.memory.tracker import TrackedMeter
    from rlparity.ops.hf import EXPERTS_IMPLEMENTATION

    if workload.attention == "chunked":
        raise RlparityError("--verify runs on the meta device, where the chunked backend cannot run (it skips key "
                            "blocks by their values); its model is validated on CPU by "
                            "conformance/test_memory_ceilings.py")
    config, t, dtype = workload.config, workload.tokens, workload.dtype
    d = Dims.of(config)
    hf_config = gpt_oss_config(config, attention=workload.attention, experts=EXPERTS_IMPLEMENTATION)
    layer = decoder_layer(hf_config, layer_index=1, dtype=dtype)
    mask = eager_mask(t, dtype, META) if workload.attention == "eager" else None
    layer_report = layer_step(TrackedMeter(META), layer, position_embeddings(hf_config, t, dtype), t, mask)
    hidden = torch.empty(t - 1, d.hidden, dtype=dtype, device=META, requires_grad=True)
    weight = torch.empty(d.vocab, d.hidden, dtype=dtype, device=META, requires_grad=True)
    targets = torch.empty(t - 1, dtype=torch.long, device=META)
    logprob_report = logprob_step(TrackedMeter(META), hidden, weight, targets, workload.logprob_chunk)
    print("\nmeasured on the meta device (tracked live tensors) against the estimate:")
    for what, report, estimate in (
        ("decoder layer", layer_report, analytic.layer_step_estimate(config, t, dtype, workload.attention)),
        ("log-prob pass", logprob_report,
         analytic.logprob_step_estimate(config, t - 1, dtype, workload.logprob_chunk)),
    ):
        for row in compare(report, estimate, {}):
            print(f"  {what}: {row.describe()}")
