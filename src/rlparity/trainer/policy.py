"""Loading a GPT-OSS checkpoint as a trainable policy, with a clear error when it cannot be loaded."""

from pathlib import Path

import torch

from rlparity.errors import RlparityError
from rlparity.models.checkpoint import open_checkpoint


def load_policy(checkpoint: Path | str) -> tuple[torch.nn.Module, int]:
    """(GptOssForCausalLM in float32 with eager attention and experts, pad id)."""
    from transformers import GptOssForCausalLM

    opened = open_checkpoint(checkpoint)  # names a missing config, a bad shape or a tokenizer mismatch
    try:
        model = GptOssForCausalLM.from_pretrained(opened.path, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager")
    except (OSError, ValueError, RuntimeError) as exc:
        raise RlparityError(f"trainer: cannot load the checkpoint {opened.path} as GptOssForCausalLM: {exc}") from exc
    pad = opened.config.get("pad_token_id")
    return model, 0 if pad is None else pad
