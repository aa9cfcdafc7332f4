"""Error measures and the tolerance policy every numerical check uses.

The rule (FlashAttention's own tests): a candidate's error against the float64 reference must be at
most k x the error of the naive PyTorch implementation run in the candidate's dtype, plus a floor.
The naive error scales the tolerance with dtype, shape and magnitude, so no case is tuned by hand.
The floor is what no implementation returning that dtype can avoid: rounding the exact answer.
"""

import math

import torch

# FlashAttention's tests accept a forward error of at most 2x the naive same-dtype error.
K_FORWARD = 2.0
# ... and 2-3x for gradients, whose longer reductions add rounding the naive autograd path orders
# differently; we take the upper end.
K_BACKWARD = 3.0
# The floor is this many half-ulps at the largest magnitude of the exact answer (one ulp): the
# worst case of merely rounding it to the output dtype, with one rounding of slack. Half an ulp is
# deterministic, where the actual rounding error of a few values can be near zero by luck.
FLOOR_ROUNDINGS = 2.0


def max_abs_error(candidate: torch.Tensor, exact: torch.Tensor) -> float:
    return (candidate.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of one rounding to `dtype`."""
    return torch.finfo(dtype).eps / 2


def half_ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The largest error of rounding a value of this magnitude to `dtype`."""
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return 0.0
    return unit_roundoff(dtype) * 2.0 ** math.floor(math.log2(magnitude)) * 2


def rounding_floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    magnitude = exact.double().abs().max().item() if exact.numel() else 0.0
    return FLOOR_ROUNDINGS * half_ulp(magnitude, dtype)


def tolerance(naive_error: float, floor: float, k: float) -> float:
    return k * naive_error + floor
