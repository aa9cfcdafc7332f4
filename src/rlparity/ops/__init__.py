"""Compute components the trainer runs in place of transformers' memory-hungry defaults.

Each has a naive counterpart it is proved equal to (tests/test_ops_*.py) and a memory ceiling it is
held to (rlparity.memory.analytic, conformance/test_memory_ceilings.py):

    logprobs_and_entropy   per-token log-probs and entropies of the lm head, chunked over tokens
    grouped_experts        GPT-OSS experts over expert-sorted tokens, weights used in place
"""

from rlparity.ops.experts import grouped_experts
from rlparity.ops.logprobs import logprobs_and_entropy, naive_logprobs_and_entropy

__all__ = ["grouped_experts", "logprobs_and_entropy", "naive_logprobs_and_entropy"]
