"""The contract's (cu_seqlens_q, cu_seqlens_k) pair: what it accepts and the one-line errors for what it does not."""

import pytest
import torch

from rlparity.attention.contract import check_inputs
from rlparity.errors import RlparityError


def tensors(total_q, total_k):
    return (torch.zeros(1, 4, total_q, 8), torch.zeros(1, 2, total_k, 8), torch.zeros(1, 2, total_k, 8),
            torch.zeros(4))


def offsets(*values):
    return torch.tensor(values, dtype=torch.int32)


def test_a_decode_batch_is_accepted():
    check_inputs(*tensors(3, 30), cu_seqlens=(offsets(0, 1, 2, 3), offsets(0, 10, 25, 30)))


@pytest.mark.parametrize(("cu_seqlens", "message"), [
    ((offsets(0, 2, 3), offsets(0, 1, 30)), "more queries than keys"),
    ((offsets(0, 1, 2, 3), offsets(0, 30)), "the same sequences"),
    ((offsets(0, 1, 3), offsets(0, 10, 29)), "cu_seqlens_k must run from 0 to the token count 30"),
    ((offsets(0, 1, 3), offsets(0, 10, 30).long()), "cu_seqlens_k must be a 1-D int32 tensor"),
    ((offsets(0, 1, 3),), "one tensor or a pair"),
    ((offsets(0, 2, 1, 3), offsets(0, 10, 5, 30)), "must not decrease"),
])
def test_bad_pairs_are_named(cu_seqlens, message):
    with pytest.raises(RlparityError, match=message):
        check_inputs(*tensors(3, 30), cu_seqlens=cu_seqlens)
