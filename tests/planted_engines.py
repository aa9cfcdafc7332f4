"""Engines with planted definitional or numerical mismatches. The semantics preflight or the layer diff must
catch and name each of them (tests/test_parity_preflight.py, tests/test_parity_diff.py).

Each wraps a working engine and changes one thing, as real trainer/rollout pipelines have gotten wrong.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from rlparity.engines import RAW, Sampling, open_engine
from rlparity.engines.sampling import sampling_logprobs, token_logprobs


class Planted:
    """Everything of the inner engine but its name and what the subclass overrides."""

    plant = "planted"

    def __init__(self, inner):
        self.inner = inner
        self.name = f"{inner.name}+{self.plant}"

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ProcessedAtTemperature(Planted):
    """Returns processed log-probs at temperature 0.7 whatever was asked: a rollout logging its sampler's values."""

    plant = "processed-T0.7"
    temperature = 0.7

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, prompt_len, Sampling(temperature=self.temperature, logprobs="processed"))


class TopKRenormalised(Planted):
    """Returns top-k-renormalised log-probs (k = 5) whatever was asked."""

    plant = "top-k5"
    top_k = 5

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, prompt_len, Sampling(top_k=self.top_k, logprobs="processed"))


class TopPRenormalised(Planted):
    """Returns top-p-renormalised log-probs (p = 0.8) whatever was asked."""

    plant = "top-p0.8"
    top_p = 0.8

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, prompt_len, Sampling(top_p=self.top_p, logprobs="processed"))


class IgnoresTemperature(Planted):
    """Returns raw log-probs when processed ones are asked for."""

    plant = "ignores-temperature"

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, prompt_len, RAW)


class OffByOne(Planted):
    """Scores the response window one token early: the last prompt token's log-prob comes first and the last
    response token's is dropped (the response mask shifted by one)."""

    plant = "off-by-one"

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        shifted = self.inner.logprobs(token_ids, [p - 1 for p in prompt_len], sampling)
        return [values[:-1] for values in shifted]


class IncludesLastPromptToken(Planted):
    """Returns one value too many per sequence: the response starts at prompt_len - 1."""

    plant = "includes-last-prompt-token"

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        return self.inner.logprobs(token_ids, [p - 1 for p in prompt_len], sampling)


class MissingNextTokenShift(Planted):
    """Scores the logits at position t against token t itself (labels not shifted): log p(x_t | x_<=t)."""

    plant = "unshifted-labels"

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        out = []
        for ids, prompt in zip(token_ids, prompt_len):
            logits = self.inner.hidden_states(ids)["logits"].double()
            rows = sampling_logprobs(logits[prompt:], sampling)  # [S - prompt, V]: positions t = prompt .. S - 1
            out.append(rows.gather(-1, torch.tensor(ids[prompt:])[:, None])[:, 0])
        return out


class GreedySampler(Planted):
    """Samples greedily from the inner engine's logits (VllmEngine.sample's interface) and reports raw log-probs
    for the sampled tokens, labelled raw."""

    plant = "greedy-sampler"
    logprobs_mode = "raw"

    def reported(self, sampling: Sampling) -> Sampling:
        return RAW

    def sample(self, prompt_ids, sampling, max_tokens, seed=None, ignore_eos=False):
        ids = list(prompt_ids)
        for _ in range(max_tokens):
            ids.append(int(self.inner.hidden_states(ids)["logits"][-1].argmax()))
        logits = self.inner.hidden_states(ids)["logits"].double()
        values = token_logprobs(logits, torch.tensor(ids), len(prompt_ids), self.reported(sampling))
        return SimpleNamespace(token_ids=ids[len(prompt_ids):], logprobs=values, logprobs_kind=self.logprobs_mode)


class SamplerLabellingProcessedAsRaw(GreedySampler):
    """Reports its sampler's processed log-probs (after temperature) but labels them raw."""

    plant = "processed-labelled-raw"

    def reported(self, sampling: Sampling) -> Sampling:
        return Sampling(temperature=sampling.temperature, logprobs="processed")


def without_sliding_window(checkpoint: Path, folder: Path) -> Path:
    """A copy of the checkpoint whose config makes every layer attend fully (the weights are shared)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in Path(checkpoint).iterdir():
        if file.name == "config.json" or not file.is_file():
            continue
        target = folder / file.name
        if file.suffix == ".safetensors":
            target.symlink_to(file.resolve())
        else:
            shutil.copy(file, target)
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


class NoSlidingWindow(Planted):
    plant = "no-sliding-window"


def hf_without_sliding_window(checkpoint: Path, folder: Path, **options) -> NoSlidingWindow:
    """The hf engine on that copy: it attends past the window where the checkpoint says it must not."""
    return NoSlidingWindow(open_engine("hf", without_sliding_window(checkpoint, folder), **options))


class TemperatureScaledAsRaw:
    """A user's engine (the --engine door: constructed as Class(checkpoint, dtype=..., max_len=...)) that returns
    log_softmax(z / T) at T = 0.7 whatever is asked, raw included: the rollout's sampling temperature left in the
    values a trainer reads as log p. Its logits are transformers' (rlparity's hf engine)."""

    temperature = 0.7

    def __init__(self, checkpoint, *, dtype, max_len=None):
        self.inner = open_engine("hf", checkpoint, dtype=dtype, max_len=max_len)

    def logprobs(self, token_ids, prompt_len, sampling=RAW):
        values = []
        for ids, prompt in zip(token_ids, prompt_len):
            logits = self.inner.hidden_states(ids)["logits"].float()  # [S, V]
            scaled = torch.log_softmax(logits[prompt - 1 : -1] / self.temperature, dim=-1)
            values.append(scaled.gather(-1, torch.tensor(ids[prompt:])[:, None])[:, 0])
        return values
