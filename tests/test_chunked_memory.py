"""The chunked backend's forward holds one [Sq, block] tile of scores at a time, never [Sq, Sk]."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlparity.attention.chunked import attend as chunked_attend
from rlparity.reference import sink_attention


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def _largest_in_forward(fn, seq, block=None):
    q = torch.randn(1, 2, seq, 16)
    k, v = torch.randn(1, 1, seq, 16), torch.randn(1, 1, seq, 16)
    kwargs = {} if block is None else {"block": block}
    with torch.no_grad(), LargestTensor() as tracker:
        fn(q, k, v, torch.zeros(2), **kwargs)
    return tracker.largest


def test_chunked_forward_never_materialises_the_score_matrix():
    seq, block, heads = 512, 64, 2
    assert _largest_in_forward(chunked_attend, seq, block) <= heads * seq * block
    assert _largest_in_forward(sink_attention, seq) >= heads * seq * seq  # the tracker does see the naive one
