"""Weight sync from trainer to rollout engine, verified: after the copy the engine holds exactly the trainer's
tensors (same names, shapes, dtypes and bits), attention sinks and routers named among them."""

from dataclasses import dataclass

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


def sync_weights(model: torch.nn.Module, sampler) -> SyncReport:
    """Copies the trainer's weights into the sampler and verifies them there."""
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    sampler.load_weights(weights)
    return verify_weights(weights, sampler.state_dict(), sampler.name)
