"""rlparity.attention.contract.check_inputs: what it reads from the values, and trusted_values() for timing loops."""

import pytest
import torch

from rlparity.attention import get_backend
from rlparity.attention.contract import check_inputs, trusted_values
from rlparity.errors import RlparityError


def inputs(dtype=torch.float32, magnitude=1.0):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 8, 64, generator=generator) * magnitude for _ in range(3))
    return q.to(dtype), k[:, :2].to(dtype), v[:, :2].to(dtype), torch.zeros(4, dtype=dtype)


def test_a_nan_sink_is_refused_outside_trusted_values_only():
    q, k, v, sinks = inputs()
    sinks[1] = float("nan")
    with pytest.raises(RlparityError, match="sinks must be finite or -inf"):
        check_inputs(q, k, v, sinks)
    with trusted_values():
        check_inputs(q, k, v, sinks)  # values are not read: no host synchronisation
        with pytest.raises(RlparityError, match="rank 4"):  # the rest is still checked
            check_inputs(q[0], k, v, sinks)
    with pytest.raises(RlparityError, match="sinks must be finite or -inf"):
        check_inputs(q, k, v, sinks)


def test_half_precision_outliers_are_not_refused():
    """Activations of a few hundred are ordinary in fp16 checkpoints: scores bounded by |scale| max|q| max|k| d
    exceed fp16's 65504 but not float32's range, which kernels accumulate scores in."""
    q, k, v, sinks = inputs(torch.float16, magnitude=100.0)
    out, lse = get_backend("reference").attend(q, k, v, sinks, scale=0.125)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_a_scale_whose_scores_exceed_float32_is_refused():
    q, k, v, sinks = inputs(torch.float16)
    with pytest.raises(RlparityError, match=r"scale 1e\+36 times q.k may reach .* beyond torch.float32's largest"):
        check_inputs(q, k, v, sinks, scale=1e36)
