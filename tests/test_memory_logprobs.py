"""The chunked log-prob and entropy pass equals the naive full-vocabulary one, forward and backward.

float64: the naive computation is the exact one; its own rounding noise is measured by evaluating it
again with the hidden dimension permuted (the same sums in another order), and the chunked pass must
be within k x that noise plus the rounding floor. bfloat16: the rule of rlparity.metrics, against the
naive pass in float64 on the same (bf16-valued) inputs, with the naive bf16 pass as the yardstick.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlparity.errors import RlparityError
from rlparity.metrics import K_BACKWARD, K_FORWARD, max_abs_error, rounding_floor, tolerance
from rlparity.ops import logprobs_and_entropy, naive_logprobs_and_entropy

TOKENS, HIDDEN, VOCAB = 48, 32, 600
LOGIT_STD = 3.0  # logits of a few units: softmaxes neither uniform nor one-hot
DTYPE_NAMES = {torch.float64: "fp64", torch.bfloat16: "bf16"}


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * LOGIT_STD / HIDDEN**0.5
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    upstream = torch.randn(TOKENS, generator=g, dtype=torch.float64), torch.randn(TOKENS, generator=g,
                                                                                  dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def _run(fn, hidden, weight, targets, upstream, **kwargs):
    """(logp, entropy, d hidden, d weight) for the loss sum(g1 logp + g2 entropy)."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logp, entropy = fn(hidden, weight, targets, **kwargs)
    loss = (logp * upstream[0].to(logp.dtype)).sum() + (entropy * upstream[1].to(entropy.dtype)).sum()
    return (logp, entropy, *torch.autograd.grad(loss, (hidden, weight)))


def _chunked(chunk):
    return lambda h, w, t, **kw: logprobs_and_entropy(h, w, t, chunk, **kw)


def _assert_within(candidate, exact, naive, dtype_of, names):
    for name, c, e, n in zip(names, candidate, exact, naive):
        k = K_BACKWARD if name.startswith("d_") else K_FORWARD
        error, naive_error = max_abs_error(c, e), max_abs_error(n, e)
        allowed = tolerance(naive_error, rounding_floor(e, dtype_of(c)), k)
        assert error <= allowed, f"{name}: error {error:.3g} > {k} x naive {naive_error:.3g} + floor = {allowed:.3g}"


NAMES = ("logp", "entropy", "d_hidden", "d_weight")


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
@pytest.mark.parametrize("chunk", [1, 7, TOKENS, 4 * TOKENS], ids=["chunk1", "chunk7", "chunk_all", "chunk_over"])
def test_float64_parity(chunk, temperature):
    hidden, weight, targets, upstream = _inputs(torch.float64)
    exact = _run(naive_logprobs_and_entropy, hidden, weight, targets, upstream, temperature=temperature)
    permutation = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(1))
    reordered = _run(naive_logprobs_and_entropy, hidden[:, permutation], weight[:, permutation], targets, upstream,
                     temperature=temperature)
    inverse = torch.argsort(permutation)
    reordered = (*reordered[:2], reordered[2][:, inverse], reordered[3][:, inverse])
    candidate = _run(_chunked(chunk), hidden, weight, targets, upstream, temperature=temperature)
    _assert_within(candidate, exact, reordered, lambda t: torch.float64, NAMES)


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
@pytest.mark.parametrize("chunk", [5, 16, TOKENS], ids=["chunk5", "chunk16", "chunk_all"])
def test_bfloat16_within_the_tolerance_rule(chunk, temperature):
    hidden, weight, targets, upstream = _inputs(torch.bfloat16)
    exact = _run(naive_logprobs_and_entropy, hidden.double(), weight.double(), targets, upstream,
                 temperature=temperature)
    naive = _run(naive_logprobs_and_entropy, hidden, weight, targets, upstream, temperature=temperature)
    candidate = _run(_chunked(chunk), hidden, weight, targets, upstream, temperature=temperature)
    assert candidate[0].dtype == torch.float32 and candidate[2].dtype == torch.bfloat16
    _assert_within(candidate, exact, naive, lambda t: t.dtype, NAMES)


def test_gradient_of_log_probs_alone_through_a_frozen_lm_head():
    """No entropy gradient (grad_entropy is None) and no weight gradient (needs_input_grad False)."""
    hidden, weight, targets, upstream = _inputs(torch.float64)

    def hidden_grad(fn, h, w):
        h = h.detach().requires_grad_()
        logp, _ = fn(h, w, targets)
        return torch.autograd.grad((logp * upstream[0]).sum(), h)[0]

    permutation = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(1))
    exact = hidden_grad(naive_logprobs_and_entropy, hidden, weight)
    reordered = hidden_grad(naive_logprobs_and_entropy, hidden[:, permutation], weight[:, permutation])
    reordered = reordered[:, torch.argsort(permutation)]
    candidate = hidden_grad(_chunked(8), hidden, weight)
    _assert_within([candidate], [exact], [reordered], lambda t: torch.float64, ["d_hidden"])


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("fn,expect_full", [(_chunked(8), False), (naive_logprobs_and_entropy, True)],
                         ids=["chunked", "naive"])
def test_chunked_never_holds_full_vocabulary_logits(fn, expect_full):
    hidden, weight, targets, upstream = _inputs(torch.bfloat16)
    with _LargestTensor() as tracker:
        _run(fn, hidden, weight, targets, upstream)
    if expect_full:
        assert tracker.largest >= TOKENS * VOCAB  # the tracker does see the naive pass's [T, V] logits
    else:
        assert tracker.largest <= max(8 * VOCAB, VOCAB * HIDDEN)  # a chunk of logits, or the weight's gradient


@pytest.mark.parametrize("bad,match", [
    (dict(chunk=0), "chunk_size must be a positive number of tokens"),
    (dict(chunk=2.5), "chunk_size must be a positive number of tokens"),
    (dict(hidden=torch.zeros(4, 3)), r"expected hidden \[T, H\] and lm_head_weight \[V, H\]"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), r"expected integer targets of shape \(4,\)"),
    (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), "expected one dtype"),
])
def test_bad_inputs_name_what_was_expected(bad, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8), targets=torch.zeros(4, dtype=torch.long), chunk=2)
    args |= bad
    with pytest.raises(RlparityError, match=match):
        logprobs_and_entropy(args["hidden"], args["weight"], args["targets"], args["chunk"])
