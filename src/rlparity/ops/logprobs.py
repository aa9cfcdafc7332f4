"""Per-token log-probs and entropies of the lm head, a chunk of tokens at a time.

    z_t        = W h_t / temperature                  logits of token t, [V]
    logp_t     = log_softmax(z_t)[target_t]
    entropy_t  = -sum_v p_tv log p_tv,   p_t = softmax(z_t)

The naive computation (`naive_logprobs_and_entropy`, what RL trainers commonly run) holds the
full-vocabulary logits of every token in float32: T x V x 4 bytes, 19.8 GB for 24,576 tokens of
GPT-OSS's 201,088-token vocabulary, several times over (logits, log-softmax, probabilities,
p log p, and the same again in the backward). The chunked computation holds the logits of `chunk_size`
tokens at a time and saves nothing of vocabulary size for the backward, which recomputes each chunk:

    d z_tv = dlogp_t (1[v = target_t] - p_tv) - dentropy_t p_tv (log p_tv + entropy_t)

Logits are computed in the inputs' dtype, as the lm head does, then taken to float32 (float64 for
float64 inputs) like the naive path. The weight gradient accumulates over chunks in that float32
type from the float32 d z, so chunking adds no rounding of partial sums; it costs one float32
[V, H] buffer during the backward.
"""

import torch

from rlparity.errors import RlparityError


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden, weight, temperature):
    """[C, H] x [V, H] -> [C, V] in the accumulation dtype, divided by the temperature."""
    logits = (hidden @ weight.T).to(_acc_dtype(hidden.dtype))
    if temperature != 1.0:
        logits.div_(temperature)  # in place: a second [C, V] buffer would double the chunk's footprint
    return logits


def naive_logprobs_and_entropy(hidden, lm_head_weight, targets, *, temperature=1.0):
    """hidden [T, H]; lm_head_weight [V, H]; targets [T] -> (logp [T], entropy [T]) via full [T, V] logits."""
    logits = (hidden @ lm_head_weight.T).to(_acc_dtype(hidden.dtype)) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(dim=-1)


class ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        tokens = hidden.shape[0]
        logprobs = hidden.new_empty(tokens, dtype=_acc_dtype(hidden.dtype))
        entropy = torch.empty_like(logprobs)
        for start in range(0, tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, tokens))
            logp = torch.log_softmax(_logits(hidden[rows], weight, temperature), dim=-1)  # [C, V]
            logprobs[rows] = logp.gather(-1, targets[rows, None])[:, 0]
            entropy[rows] = -logp.exp().mul_(logp).sum(dim=-1)
            del logp  # before the next chunk's logits exist, not after
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.options = (chunk_size, temperature)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, entropy = ctx.saved_tensors
        chunk_size, temperature = ctx.options
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc = entropy.dtype
        tokens = hidden.shape[0]
        grad_logprobs = torch.zeros_like(entropy) if grad_logprobs is None else grad_logprobs.to(acc)
        grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy.to(acc)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        for start in range(0, tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, tokens))
            logp = torch.log_softmax(_logits(hidden[rows], weight, temperature), dim=-1)  # [C, V]
            probs = logp.exp()
            # In place on the chunk's own buffers, so the backward holds two [C, V] float32 tensors, not five.
            dlogits = logp.add_(entropy[rows, None]).mul_(probs).mul_(-grad_entropy[rows, None])
            dlogits.sub_(probs.mul_(grad_logprobs[rows, None]))
            del probs
            index = torch.arange(dlogits.shape[0], device=dlogits.device)
            dlogits[index, targets[rows]] += grad_logprobs[rows]
            if temperature != 1.0:
                dlogits.div_(temperature)
            if need_hidden:
                grad_hidden[rows] = dlogits.to(hidden.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(dlogits.T, hidden[rows].to(acc))
            del logp, dlogits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _check_inputs(hidden, weight, targets, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise RlparityError(f"logprobs_and_entropy: expected hidden [T, H] and lm_head_weight [V, H], got "
                            f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise RlparityError(f"logprobs_and_entropy: expected integer targets of shape ({hidden.shape[0]},), got "
                            f"{targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise RlparityError(f"logprobs_and_entropy: hidden is {hidden.dtype} and lm_head_weight {weight.dtype}; "
                            "expected one dtype (the lm head's)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise RlparityError(f"logprobs_and_entropy: chunk_size must be a positive number of tokens, got {chunk_size!r}")


def logprobs_and_entropy(hidden, lm_head_weight, targets, chunk_size, *, temperature=1.0):
    """hidden [T, H]; lm_head_weight [V, H]; targets [T] -> (logp [T], entropy [T]), float32 (float64 for float64).

    Equal to naive_logprobs_and_entropy, differentiable in hidden and lm_head_weight, and never holding more
    than chunk_size x V logits. Both outputs are differentiable: a loss may use the entropy as a bonus.
    """
    _check_inputs(hidden, lm_head_weight, targets, chunk_size)
    return ChunkedLogprobs.apply(hidden, lm_head_weight, targets.long(), chunk_size, float(temperature))
