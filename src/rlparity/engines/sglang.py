"""The SGLang engine: SGLang's offline `Engine` (GPU only) in its own process, for teacher-forced log-probs.

SGLang does not have to be installed beside rlparity. The engine process runs under the interpreter named
by RLPARITY_SGLANG_PYTHON, else this one when it has SGLang; it starts with the engine, serves every
request, and ends with `close()` (or the `with` block):

    with SglangEngine(checkpoint, dtype="bfloat16") as engine:
        engine.info["server_args"]["attention_backend"]   # what SGLang chose
        engine.logprobs([ids], [prompt_len])               # teacher-forced, SGLang's input_token_logprobs

How (read from SGLang's public sources, sgl-project/sglang: entrypoints/engine.py at 001067ff, layers/
logits_processor.py at 009db01a, managers/scheduler_output_processor_mixin.py; a stored version.py says
0.5.3rc2, and the [sglang] extra asks for sglang>=0.5): `sgl.Engine(model_path=..., dtype=...,
context_length=..., random_seed=..., skip_tokenizer_init=True, disable_radix_cache=True, ...)`, then one
`Engine.generate(input_ids=[...], sampling_params={"max_new_tokens": 1, "temperature": 0.0},
return_logprob=True, logprob_start_len=0)` for a batch. Each result's
`meta_info["input_token_logprobs"]` is a list of (logprob, token_id, text) aligned with
input_ids[logprob_start_len:], its first logprob always None (scheduler_output_processor_mixin pads it); the
engine process checks both the alignment and the token ids before returning anything. The radix cache is off
so that every request prefills every token.

What the numbers mean: SGLang computes input-token log-probs in its LogitsProcessor as log_softmax of the raw
logits (in float32). Temperature scaling and top-p renormalisation there are per-request flags
(Req.temp_scaled_logprobs, Req.top_p_normalized_logprobs) that the generate API does not set, and top-k is
never applied, so teacher-forced log-probs are raw whatever sampling_params say; asking for processed ones
raises with that reason. SGLANG_RETURN_ORIGINAL_LOGPROB concerns sampled (output) tokens only.

Unverified here: the development machines have no GPU, so this engine has only run its CPU-side parts
(discovery, validation, the parsing of SGLang's output); the gpu-marked tests exercise the rest.
"""

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines.base import RAW, Sampling, check_raw_logprobs_request, engine_max_len
from rlparity.engines.process import EngineProcess, EngineProcessError, find_engine_python, launch_worker
from rlparity.errors import RlparityError
from rlparity.models.checkpoint import open_checkpoint

PYTHON_ENV = "RLPARITY_SGLANG_PYTHON"
# SGLang starts a scheduler and a detokenizer process, loads the model and compiles or autotunes kernels on first
# use: minutes on a cold GPU node. Not measured here (no GPU); generous on purpose.
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 180.0
# SGLang refuses a request when input tokens + max_new_tokens >= its context length
# (TokenizerManager._validate_one_request), and one new token is always asked for: SGLang's context length is
# the engine's max_len + 2.
CONTEXT_HEADROOM = 2
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          torch.float32: "float32", torch.bfloat16: "bfloat16"}
NEEDS_CUDA = "SGLang needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False)"
INSTALL_HINT = (f"on a CUDA machine create a separate environment with `python -m venv VENV && VENV/bin/pip install "
                f"'sglang>=0.5'` (or install rlparity's [sglang] extra into this one), then set "
                f"{PYTHON_ENV}=VENV/bin/python")
PROCESSED_TEACHER_FORCED = (
    "SGLang computes input (teacher-forced) log-probs from the raw logits: its temperature scaling and top-p "
    "renormalisation of input log-probs are per-request flags (Req.temp_scaled_logprobs, "
    "Req.top_p_normalized_logprobs) that Engine.generate does not expose, and top-k is never applied to them, so "
    "only raw teacher-forced log-probs exist")


def find_sglang_python() -> tuple[str | None, str]:
    """(interpreter, how it was chosen), or (None, why there is none and what to do)."""
    return find_engine_python(PYTHON_ENV, "sglang", "SGLang", INSTALL_HINT)


def unavailable_reason() -> str | None:
    """None when a CUDA device and an interpreter for the SGLang engine are found, else the actionable reason."""
    if not torch.cuda.is_available():
        return NEEDS_CUDA
    python, how = find_sglang_python()
    return None if python else how


# The sequences as int lists, after every check SglangEngine.logprobs makes before asking SGLang.
check_logprobs_request = functools.partial(check_raw_logprobs_request, processed_unavailable=PROCESSED_TEACHER_FORCED)


class SglangEngine:
    def __init__(self, checkpoint: Path | str, *, dtype: torch.dtype | str = torch.bfloat16,
                 max_len: int | None = None, tokenizer: Path | str | None = None, seed: int = 0,
                 attention_backend: str | None = None, mem_fraction_static: float = 0.3,
                 model_overrides: dict | None = None, python: str | None = None,
                 start_timeout: float = START_TIMEOUT_S, request_timeout: float = REQUEST_TIMEOUT_S,
                 log_path: Path | str | None = None):
        """Checks the options and the checkpoint, starts the engine process and waits until SGLang has loaded it.

        attention_backend: SGLang's own option (None lets SGLang pick one for GPT-OSS on this GPU; `info` says
        which). mem_fraction_static: the share of GPU memory SGLang takes for weights and KV cache (its default,
        ~0.9, is far more than a tiny model needs on a shared GPU). model_overrides: config fields SGLang should
        read differently from config.json (its json_model_override_args), e.g. to plant a mismatch.
        """
        if dtype not in DTYPES:
            raise RlparityError(f"sglang engine: dtype {dtype!r} is not supported; expected one of "
                                f"{sorted(key for key in DTYPES if isinstance(key, str))}")
        if not 0 < mem_fraction_static < 1:
            raise RlparityError(f"sglang engine: mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        self.dtype = getattr(torch, DTYPES[dtype])
        self.name = f"sglang[{DTYPES[dtype]}]"
        opened = open_checkpoint(checkpoint, tokenizer)
        self.checkpoint, self.config, self.tokenizer = opened.path.resolve(), opened.config, opened.tokenizer
        ceiling = opened.max_position_embeddings - CONTEXT_HEADROOM
        if max_len is not None and max_len > ceiling:
            raise RlparityError(f"{self.name}: max_len {max_len} must be at most {ceiling}: SGLang's context length "
                                f"is max_len + {CONTEXT_HEADROOM} (the sampled token and its own limit check), which "
                                f"may not exceed max_position_embeddings ({opened.max_position_embeddings}) of "
                                f"{opened.path / 'config.json'}")
        self.max_len = engine_max_len(self.name, ceiling if max_len is None else max_len,
                                      opened.max_position_embeddings, opened.path)
        tokenizer_folder = None if tokenizer is None else Path(tokenizer).resolve()
        if tokenizer_folder is not None and tokenizer_folder.is_file():
            tokenizer_folder = tokenizer_folder.parent
        self.options = {"checkpoint": str(self.checkpoint), "tokenizer": tokenizer_folder and str(tokenizer_folder),
                        "dtype": DTYPES[dtype], "context_length": self.max_len + CONTEXT_HEADROOM, "seed": seed,
                        "attention_backend": attention_backend, "mem_fraction_static": mem_fraction_static,
                        "model_overrides": model_overrides}
        self.request_timeout = request_timeout
        self.process = None
        self.process, self.info = self._launch(python, start_timeout, log_path)

    def _launch(self, python: str | None, start_timeout: float, log_path) -> tuple[EngineProcess, dict]:
        if not torch.cuda.is_available():
            raise RlparityError(f"sglang engine unavailable: {NEEDS_CUDA}")
        if python is None:
            python, how = find_sglang_python()
            if python is None:
                raise RlparityError(f"sglang engine unavailable: {how}")
        return launch_worker("sglang", python, "rlparity.engines.sglang_worker", self.options, start_timeout, log_path)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]:
        """Teacher-forced raw log-probs of each sequence's response, all sequences in one generate call."""
        sequences = check_logprobs_request(self.name, token_ids, prompt_len, sampling, self.max_len,
                                           self.config["vocab_size"])
        per_sequence = self.process.request("prompt_logprobs", self.request_timeout, token_ids=sequences)["logprobs"]
        return [torch.tensor(values[prompt - 1:], dtype=torch.float32)
                for values, prompt in zip(per_sequence, prompt_len)]

    def close(self) -> None:
        if self.process is not None:
            self.process.close()

    def __enter__(self) -> "SglangEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["SglangEngine", "EngineProcessError", "find_sglang_python", "unavailable_reason", "check_logprobs_request",
           "PYTHON_ENV", "NEEDS_CUDA"]
