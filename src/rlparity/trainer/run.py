"""A whole training run: open the engine, evaluate, train, evaluate, close the engine whatever happens."""

import time
from collections.abc import Callable
from pathlib import Path

from rlparity.results import ResultStore
from rlparity.trainer import distributed
from rlparity.trainer.config import TrainConfig
from rlparity.trainer.trainer import Trainer


def open_sampler(config: TrainConfig, checkpoint: Path):
    """The rollout engine the config names, on the starting checkpoint."""
    if config.engine == "hf":
        from rlparity.trainer.hf_sampler import HFSampler

        return HFSampler(checkpoint, temperature=config.temperature)
    from rlparity.trainer.vllm_sampler import VllmSampler

    return VllmSampler(checkpoint, temperature=config.temperature, sync=config.vllm_sync)


def train_run(config: TrainConfig, checkpoint: Path, store: ResultStore, *, evaluate: bool = True,
              sampler_factory: Callable = open_sampler, **trainer_options) -> dict:
    """Closes the engine on the way out, also when a step fails (the error record is already written)."""
    config.check()
    start = time.monotonic()
    # Under FSDP rank 0 alone runs the rollout engine (rlparity.trainer.distributed).
    sampler = sampler_factory(config, checkpoint) if distributed.rank() == 0 else None
    try:
        trainer = Trainer(config, checkpoint, sampler, store, **trainer_options)
        summary: dict = {}
        if evaluate:
            summary["reward_before"] = trainer.evaluate("before")
        summary["history"] = trainer.train()
        if evaluate:
            summary["reward_after"] = trainer.evaluate("after")
    finally:
        close = getattr(sampler, "close", None)
        if close is not None:
            close()
    summary["seconds"] = time.monotonic() - start
    return summary

