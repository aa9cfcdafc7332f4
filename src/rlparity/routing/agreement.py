"""Routing agreement between two sides (engines, passes, dtypes) on the same sequences, per layer.

    set agreement     the token's k experts are the same set (what the MoE output depends on)
    order agreement   the same ids in the same order (largest logit first)
    flip              the set differs; its gap is side a's k-th minus (k+1)-th logit (rlparity.routing.census)
    large-gap flip    a flip at a gap above census.large_gap_threshold in the compared dtype: a bug, not rounding
    inconsistent flip a flip that the logits both sides report cannot produce: when each side's ids are the top-k
                      of its own logits and no logit differs by more than d, the sets can differ only where the
                      gap is <= 2d; above that, one side did not route by the logits it reports (a tie broken by
                      batch position, ids captured from another pass). Exact ties (gap 0) never count.

Gaps are read from side a's router logits: put the more precise side first.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.routing.census import (
    GapBin,
    bins_as_dicts,
    gap_bins,
    gap_distribution,
    large_gap_threshold,
    rounding_scale,
    topk_gaps,
)

# A token whose logits are all exactly 0 has no rounding scale; this keeps the ratio finite (float64's tiniest normal).
MIN_SCALE = torch.finfo(torch.float64).tiny
MAX_EXAMPLES = 5  # large-gap flips listed by name in a comparison, for the error message and the record


@dataclass
class LayerAgreement:
    layer: int
    tokens: int
    set_agreement: float
    order_agreement: float
    flips: int
    large_gap_flips: int
    inconsistent_flips: int  # 0 when a side reports no logits: nothing to check against
    flagged_flips: int  # large-gap or inconsistent: flips rounding cannot explain
    median_gap_at_flips: float | None
    max_logit_diff: float | None  # max |logit_a - logit_b| when both sides report logits
    logit_diff_roundings: float | None  # max over tokens of that, in units of rounding_scale: the gap that
    # rounding reached here, comparable with census.LARGE_GAP_ROUNDINGS
    gaps: dict  # side a's gap quantiles and near-tie fractions
    bins: list[GapBin]

    def as_dict(self) -> dict:
        return {key: value for key, value in vars(self).items() if key != "bins"} | {"bins": bins_as_dicts(self.bins)}


@dataclass
class RoutingComparison:
    a: str
    b: str
    dtype: torch.dtype  # whose rounding decides what a large gap is: the coarser side's
    tokens: int
    differ_any_layer: float  # fraction of tokens whose set differs in at least one layer
    layers: list[LayerAgreement]
    flagged_examples: list[dict] = field(default_factory=list)  # the first large-gap or inconsistent flips

    @property
    def flips(self) -> int:
        return sum(layer.flips for layer in self.layers)

    @property
    def large_gap_flips(self) -> int:
        return sum(layer.large_gap_flips for layer in self.layers)

    @property
    def inconsistent_flips(self) -> int:
        return sum(layer.inconsistent_flips for layer in self.layers)

    @property
    def bug_flips(self) -> int:
        """(token, layer) flips that rounding cannot explain: large-gap, inconsistent, or both."""
        return sum(layer.flagged_flips for layer in self.layers)

    @property
    def identical(self) -> bool:
        return all(layer.order_agreement == 1.0 for layer in self.layers)

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "dtype": str(self.dtype).removeprefix("torch."), "tokens": self.tokens,
                "differ_any_layer": self.differ_any_layer, "flips": self.flips,
                "large_gap_flips": self.large_gap_flips, "inconsistent_flips": self.inconsistent_flips,
                "bug_flips": self.bug_flips,
                "layers": [layer.as_dict() for layer in self.layers], "flagged_examples": self.flagged_examples}


def _check_shapes(a: Sequence[Routing], b: Sequence[Routing], names: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise RlparityError(f"routing comparison: {names[0]} has {len(a)} sequences, {names[1]} has {len(b)}")
    for i, (ra, rb) in enumerate(zip(a, b)):
        if len(ra.expert_ids) != len(rb.expert_ids):
            raise RlparityError(f"routing comparison: sequence {i}: {names[0]} has {len(ra.expert_ids)} layers, "
                                f"{names[1]} has {len(rb.expert_ids)}")
        for layer, (ia, ib) in enumerate(zip(ra.expert_ids, rb.expert_ids)):
            if ia.shape != ib.shape:
                raise RlparityError(f"routing comparison: sequence {i}, layer {layer}: {names[0]} expert ids "
                                    f"{tuple(ia.shape)}, {names[1]} {tuple(ib.shape)}; expected the same [tokens, k]")
        if ra.router_logits is None and rb.router_logits is None:
            raise RlparityError(f"routing comparison: sequence {i}: neither {names[0]} nor {names[1]} reports router "
                                f"logits, so the gaps of the near-tie census are unknown")


def compare_routing(a: Sequence[Routing], b: Sequence[Routing], *, dtype: torch.dtype,
                    names: tuple[str, str] = ("a", "b")) -> RoutingComparison:
    """Per-layer agreement of b's routes with a's over the same sequences (each a Routing per sequence)."""
    _check_shapes(a, b, names)
    num_layers = len(a[0].expert_ids)
    positions = torch.cat([torch.arange(len(r.expert_ids[0])) for r in a])
    sequences = torch.cat([torch.full((len(r.expert_ids[0]),), i) for i, r in enumerate(a)])
    differ_any = torch.zeros(len(positions), dtype=torch.bool)
    layers, examples = [], []
    for layer in range(num_layers):
        ids_a = torch.cat([r.expert_ids[layer].cpu() for r in a]).long()
        ids_b = torch.cat([r.expert_ids[layer].cpu() for r in b]).long()
        top_k = ids_a.shape[1]
        logits_a = _logits(a, layer)
        logits_b = _logits(b, layer)
        gap_logits = logits_a if logits_a is not None else logits_b
        gaps = topk_gaps(gap_logits, top_k)
        flipped = (ids_a.sort(dim=-1).values != ids_b.sort(dim=-1).values).any(dim=-1)
        large = flipped & (gaps > large_gap_threshold(gap_logits, dtype))
        inconsistent = torch.zeros_like(flipped)
        differ_any |= flipped
        max_diff = roundings = None
        if logits_a is not None and logits_b is not None and logits_a.numel():
            per_token = (logits_a - logits_b).abs().max(dim=-1).values
            inconsistent = flipped & (gaps > 2 * per_token)
            max_diff = per_token.max().item()
            roundings = (per_token / rounding_scale(gap_logits, dtype).clamp_min(MIN_SCALE)).max().item()
        for t in (large | inconsistent).nonzero().flatten()[: MAX_EXAMPLES - len(examples)].tolist():
            why = " and ".join(kind for kind, flag in (("large gap", large), ("inconsistent", inconsistent)) if flag[t])
            examples.append({"layer": layer, "sequence": int(sequences[t]), "position": int(positions[t]),
                             "gap": gaps[t].item(), "why": why, names[0]: ids_a[t].tolist(),
                             names[1]: ids_b[t].tolist()})
        layers.append(LayerAgreement(
            layer=layer, tokens=len(ids_a),
            set_agreement=1.0 - flipped.double().mean().item(),
            order_agreement=(ids_a == ids_b).all(dim=-1).double().mean().item(),
            flips=int(flipped.sum()), large_gap_flips=int(large.sum()), inconsistent_flips=int(inconsistent.sum()),
            flagged_flips=int((large | inconsistent).sum()),
            median_gap_at_flips=gaps[flipped].median().item() if flipped.any() else None,
            max_logit_diff=max_diff, logit_diff_roundings=roundings, gaps=gap_distribution(gaps),
            bins=gap_bins(gaps, flipped)))
    return RoutingComparison(a=names[0], b=names[1], dtype=dtype, tokens=len(positions),
                             differ_any_layer=differ_any.double().mean().item(), layers=layers,
                             flagged_examples=examples)


def _logits(routes: Sequence[Routing], layer: int) -> torch.Tensor | None:
    if any(r.router_logits is None for r in routes):
        return None
    return torch.cat([r.router_logits[layer].detach().cpu().double() for r in routes])


def coarser_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype with the largest rounding error: the one whose rounding can explain a flip."""
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)
