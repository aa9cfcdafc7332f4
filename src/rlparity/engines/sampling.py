"""Turning logits into the per-token log-probs a Sampling asks for, for engines that return logits.

Processed log-probs follow vLLM's sampler, so an engine that computes them here means the same thing
as vLLM's processed_logprobs: temperature first, then top-k, then top-p, then renormalise.
"""

import torch

from rlparity.engines.base import Sampling


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N, V] -> True where a token is dropped: below the k-th largest logit (ties with it are kept)."""
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits < kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """[N, V] -> True where a token is dropped: tokens outside the smallest top set whose mass reaches p.

    As vLLM: sort ascending, drop tokens whose cumulative probability (from the bottom) is <= 1 - p,
    always keeping the most probable token.
    """
    ascending, order = logits.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False
    return drop_sorted.scatter(-1, order, drop_sorted)


def sampling_logprobs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[N, V] logits -> [N, V] log-probs of the distribution `sampling` names."""
    if sampling.logprobs == "raw":
        return torch.log_softmax(logits, dim=-1)
    # Shifted to max 0 (softmax does not see a shift) and divided in float64: a tiny temperature then sends the
    # others to -inf, where logits / 1e-300 overflowed to inf, or 1e-300 rounded to 0 in float32, and log_softmax
    # returned NaN (found by reliability/test_properties_requests.py).
    dtype = logits.dtype
    logits = ((logits - logits.amax(dim=-1, keepdim=True)).double() / sampling.temperature).to(dtype)
    if 0 < sampling.top_k < logits.shape[-1]:
        logits = logits.masked_fill(top_k_mask(logits, sampling.top_k), float("-inf"))
    if sampling.top_p < 1:
        logits = logits.masked_fill(top_p_mask(logits, sampling.top_p), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, prompt_len: int, sampling: Sampling) -> torch.Tensor:
    """logits [S, V] of one sequence, token_ids [S] -> [S - prompt_len]: log p(token_t | tokens_<t), t >= prompt_len.

    The logits at position t - 1 predict token t.
    """
    predicting = sampling_logprobs(logits[prompt_len - 1 : -1], sampling)  # [S - prompt_len, V]
    return predicting.gather(-1, token_ids[prompt_len:, None]).squeeze(-1)
