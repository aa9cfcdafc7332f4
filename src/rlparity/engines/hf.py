"""The trainer side: transformers' GptOssForCausalLM, in eval mode, without gradients.

Sequences of a logprobs call run as one right-padded batch with an attention mask, as a trainer's
log-prob pass does; logits are upcast to float32 before the log-softmax. Routing and hidden states
are captured with forward hooks on transformers' own modules (the router's outputs are what the
experts used, not a recomputation).

attn_implementation: what transformers accepts for GPT-OSS on this machine. On CPU that is `eager`
only: GPT-OSS declares no SDPA support, its flex path refuses sinks on CPU, and the flash kernels need
CUDA and the `kernels` package. experts_implementation: transformers' `eager` loop over experts,
`grouped_mm` or `batched_mm`.
FSDP2 wrapping (the verl trainer's setup): the `hf_fsdp` engine (rlparity.engines.hf_fsdp).
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines.base import (
    RAW,
    Routing,
    Sampling,
    capture_points,
    check_request,
    check_sequence,
    engine_max_len,
    right_pad,
)
from rlparity.engines.sampling import token_logprobs
from rlparity.errors import RlparityError
from rlparity.models.checkpoint import open_checkpoint

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RlparityError(f"hf engine: dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")


class HFEngine:
    def __init__(self, checkpoint: Path | str, *, dtype: torch.dtype | str = torch.float32,
                 attn_implementation: str = "eager", experts_implementation: str = "eager",
                 max_len: int | None = None, tokenizer: Path | str | None = None):
        from transformers import GptOssForCausalLM

        self.dtype = parse_dtype(dtype)
        self.name = f"hf[{attn_implementation},{experts_implementation},{str(self.dtype).removeprefix('torch.')}]"
        opened = open_checkpoint(checkpoint, tokenizer)
        self.checkpoint, self.config, self.tokenizer = opened.path, opened.config, opened.tokenizer
        self.max_len = engine_max_len(self.name, max_len, opened.max_position_embeddings, opened.path)
        if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise RlparityError(f"{self.name}: experts_implementation {experts_implementation!r} is not one of "
                                f"{EXPERTS_IMPLEMENTATIONS}")
        pad = self.config.get("pad_token_id")
        self.pad_id = 0 if pad is None else pad  # padded positions are masked; any id in range will do
        try:
            self.model = GptOssForCausalLM.from_pretrained(
                opened.path, dtype=self.dtype, attn_implementation=attn_implementation,
                experts_implementation=experts_implementation,
            )
            self.model.eval()
            # some paths load and refuse only when run (transformers' flex attention with sinks on CPU)
            self._forward(torch.full((1, 2), self.pad_id))
        except (ValueError, ImportError, RuntimeError, NotImplementedError) as exc:
            raise RlparityError(f"hf engine: transformers cannot run GPT-OSS with attn_implementation="
                                f"{attn_implementation!r} here: {exc}") from exc

    def close(self) -> None:
        self.model = None

    def _forward(self, batch: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=batch, attention_mask=mask).logits

    def logprobs(self, token_ids: Sequence[Sequence[int]], prompt_len: Sequence[int],
                 sampling: Sampling = RAW) -> list[torch.Tensor]:
        token_ids = check_request(self.name, token_ids, prompt_len, self.max_len, self.config["vocab_size"])
        batch, mask = right_pad(token_ids, self.pad_id)
        logits = self._forward(batch, mask).float()
        return [token_logprobs(logits[i, : len(sequence)], batch[i, : len(sequence)], prompt, sampling)
                for i, (sequence, prompt) in enumerate(zip(token_ids, prompt_len))]

    def _single(self, token_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([check_sequence(self.name, token_ids, self.max_len, self.config["vocab_size"])])

    def routing(self, token_ids: Sequence[int]) -> Routing:
        layers = self.model.model.layers
        captured: list = [None] * len(layers)

        def hook(index):
            def record(module, args, output):
                captured[index] = output  # (router_logits [S, E], router_scores [S, k], router_indices [S, k])
            return record

        handles = [layer.mlp.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            self._forward(self._single(token_ids))
        finally:
            for handle in handles:
                handle.remove()
        return Routing(expert_ids=[out[2] for out in captured], router_logits=[out[0] for out in captured])

    def hidden_states(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        model = self.model
        modules = {"embed": model.model.embed_tokens, "norm": model.model.norm, "logits": model.lm_head}
        for i, layer in enumerate(model.model.layers):
            modules |= {f"layers.{i}.attn": layer.self_attn, f"layers.{i}.mlp": layer.mlp, f"layers.{i}": layer}
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(module, args, output):
                # attention and MLP blocks return (output, weights or router scores)
                captured[name] = (output[0] if isinstance(output, tuple) else output)[0]
            return record

        handles = [modules[name].register_forward_hook(hook(name)) for name in capture_points(len(model.model.layers))]
        try:
            self._forward(self._single(token_ids))
        finally:
            for handle in handles:
                handle.remove()
        return {name: captured[name] for name in capture_points(len(model.model.layers))}
