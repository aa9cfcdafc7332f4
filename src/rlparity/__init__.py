"""rlparity: conformance and benchmark harness for RL post-training of MoE LLMs with attention sinks."""

from rlparity.errors import RlparityError

__all__ = ["RlparityError"]
__version__ = "0.1.0"
