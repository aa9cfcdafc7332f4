"""Ground truth in plain PyTorch: exact in float64, no options beyond the math.

Nothing here imports anything else from rlparity.
"""

from rlparity.reference.attention import (
    default_scale,
    sequence_ids,
    sink_attention,
    sink_attention_backward,
    visibility,
    visible_keys,
)
from rlparity.reference.gpt_oss import GptOssOutput
from rlparity.reference.gpt_oss import forward as gpt_oss_forward
from rlparity.reference.moe import moe_block, moe_experts, moe_router, swiglu_clamped

__all__ = [
    "GptOssOutput",
    "default_scale",
    "gpt_oss_forward",
    "moe_block",
    "moe_experts",
    "moe_router",
    "sink_attention",
    "sink_attention_backward",
    "swiglu_clamped",
    "sequence_ids",
    "visibility",
    "visible_keys",
]
