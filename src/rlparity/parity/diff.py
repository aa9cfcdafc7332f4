"""The first diverging layer: both sides' activations on the same tokens, capture point by capture point.

What each engine captures and how, and the command line: rlparity.parity.diff_command (`rlparity diff --help`).

The error at a point is ||a - b|| / ||b|| (Frobenius, float64). Its noise floor is the same error of the plain
reference run in the comparison's dtype (the less precise side's) against the reference in float64, on the same
tokens (the naive-implementation rule of rlparity.metrics); a point is above its floor when its error exceeds
K_PARITY x floor + the dtype's unit roundoff. Per token the same rule gives the first token position above the
floor, which separates a windowing difference (agreement up to the window) from others.
"""

import math
from dataclasses import dataclass

import torch

from rlparity.engines.base import capture_points, captures, require_same_tokenizers, routes
from rlparity.errors import RlparityError
from rlparity.metrics import unit_roundoff
from rlparity.parity.floors import K_PARITY
from rlparity.parity.sides import DTYPES, EnginePool, Side


@dataclass
class PointDiff:
    name: str
    error: float  # ||a - b|| / ||b||
    floor: float  # the naive same-dtype error at this point
    threshold: float  # K_PARITY x floor + unit roundoff
    first_token: int | None  # first position whose own error exceeds its threshold
    routed_differently: int | None = None  # MoE rows: tokens whose expert set differs

    @property
    def ratio(self) -> float:
        return self.error / self.threshold

    @property
    def above(self) -> bool:
        return self.error > self.threshold


@dataclass
class DiffReport:
    a: str
    b: str
    floor_dtype: str
    tokens: int
    points: list[PointDiff]
    hint: str

    @property
    def first(self) -> PointDiff | None:
        return next((point for point in self.points if point.above), None)

    def table(self) -> list[str]:
        lines = [f"{self.a} (a) vs {self.b} (b) on {self.tokens} tokens; floor: reference in {self.floor_dtype} vs "
                 f"float64, threshold {K_PARITY:g} x floor + unit roundoff",
                 f"{'capture point':<18} {'rel. error':>10} {'floor':>10} {'ratio':>9} {'from token':>10}  note"]
        for point in self.points:
            note = "<-- first above its floor" if point is self.first else ("above" if point.above else "")
            if point.routed_differently:
                note = f"{note}  {point.routed_differently} tokens routed differently".strip()
            token = "-" if point.first_token is None else str(point.first_token)
            lines.append(f"{point.name:<18} {point.error:>10.3g} {point.floor:>10.3g} {point.ratio:>9.3g} "
                         f"{token:>10}  {note}")
        lines.append(self.hint)
        return lines


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    difference, scale = (a.double() - b.double()).norm().item(), b.double().norm().item()
    if scale == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / scale


def token_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[S]: each position's relative error (rows of [S, H])."""
    a, b = a.double(), b.double()
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)


def capture(engine, token_ids: list[int], num_layers: int) -> dict[str, torch.Tensor]:
    if not captures(engine):
        raise RlparityError(f"{engine.name} cannot report its activations (no hidden_states): the layer diff needs "
                            f"both sides to capture")
    captured = engine.hidden_states(token_ids)
    missing = [name for name in capture_points(num_layers) if name not in captured]
    if missing:
        raise RlparityError(f"{engine.name} captured {sorted(captured)}, missing {missing}")
    return captured


def naive_floors(naive, truth, token_ids: list[int], num_layers: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Per capture point: (error, per-token errors) of the plain reference in the comparison's dtype (`naive`)
    against the reference in float64 (`truth`); zero when `naive` is None (a float64 comparison)."""
    names = capture_points(num_layers)
    if naive is None:
        return {name: (0.0, torch.zeros(len(token_ids), dtype=torch.float64)) for name in names}
    exact, plain = capture(truth, token_ids, num_layers), capture(naive, token_ids, num_layers)
    return {name: (relative_error(plain[name], exact[name]), token_errors(plain[name], exact[name])) for name in names}


def routing_differences(a_engine, b_engine, token_ids) -> list[int] | None:
    if not (routes(a_engine) and routes(b_engine)):
        return None
    a, b = a_engine.routing(token_ids).expert_ids, b_engine.routing(token_ids).expert_ids
    return [int((x.sort(dim=-1).values != y.sort(dim=-1).values).any(dim=-1).sum()) for x, y in zip(a, b)]


def window_hint(point: PointDiff, config: dict) -> str:
    name = point.name
    if name == "embed":
        return "the embeddings differ: the sides load different weights, or read the token ids differently"
    if name in ("norm", "logits"):
        return {"norm": "the final RMSNorm differs", "logits": "the LM head or logits processing differs "
                "(scaling, soft-capping, vocabulary padding)"}[name]
    layer = int(name.split(".")[1])
    kind = config["layer_types"][layer]
    window = config["sliding_window"] if kind == "sliding_attention" else None
    if name.endswith(".attn"):
        if point.first_token is not None and window is not None and point.first_token == window:
            return (f"attention in layer {layer} ({kind}, window {window}) agrees on tokens 0..{window - 1} and "
                    f"diverges from token {window} on, the first query whose window drops a key: one side ignores or "
                    f"misplaces the sliding window")
        if point.first_token:
            return (f"attention in layer {layer} ({kind}{f', window {window}' if window else ''}) agrees up to token "
                    f"{point.first_token - 1} and diverges from token {point.first_token} on: a position-dependent "
                    f"difference (window size, RoPE/YaRN at long range)")
        return (f"attention in layer {layer} ({kind}) differs from the first token on: look at the sinks, RoPE/YaRN, "
                f"the softmax scale or the attention weights")
    if name.endswith(".mlp"):
        routed = f"; {point.routed_differently} tokens were routed to other experts" if point.routed_differently else ""
        return f"the MoE block of layer {layer} differs (router or experts){routed}"
    return f"the residual stream after layer {layer} differs while its attention and MoE outputs agree"


def floor_dtype(a: Side, b: Side) -> str:
    return max((a, b), key=lambda side: torch.finfo(side.torch_dtype).eps).dtype


def layer_diff(a_engine, b_engine, token_ids: list[int], floors: dict, dtype: str) -> DiffReport:
    """Both engines' activations on token_ids against each other, each point judged by its floor (naive_floors)."""
    require_same_tokenizers(a_engine, b_engine)
    config = a_engine.config
    num_layers = config["num_hidden_layers"]
    roundoff = unit_roundoff(DTYPES[dtype])
    got_a, got_b = capture(a_engine, token_ids, num_layers), capture(b_engine, token_ids, num_layers)
    routed = routing_differences(a_engine, b_engine, token_ids)
    points = []
    for name in capture_points(num_layers):
        floor, token_floor = floors[name]
        above = (token_errors(got_a[name], got_b[name]) > K_PARITY * token_floor.max() + roundoff).nonzero()
        layer_routing = None
        if routed is not None and name.endswith(".mlp"):
            layer_routing = routed[int(name.split(".")[1])]
        points.append(PointDiff(name, relative_error(got_a[name], got_b[name]), floor, K_PARITY * floor + roundoff,
                                int(above[0]) if len(above) else None, layer_routing))
    report = DiffReport(a_engine.name, b_engine.name, dtype, len(token_ids), points, "")
    first = report.first
    report.hint = ("no capture point is above its noise floor" if first is None
                   else f"first above its floor: {first.name} ({first.ratio:.3g} x its threshold): "
                        f"{window_hint(first, config)}")
    return report


def diff_sides(pool: EnginePool, a: Side, b: Side, token_ids: list[int]) -> DiffReport:
    """layer_diff of two sides of the pool, with floors from the pool's reference engines."""
    a_engine, b_engine = pool.get(a), pool.get(b)
    dtype = floor_dtype(a, b)
    naive = None if dtype == "float64" else pool.get(Side("reference", dtype))
    truth = pool.get(Side("reference", "float64"))
    floors = naive_floors(naive, truth, token_ids, a_engine.config["num_hidden_layers"])
    return layer_diff(a_engine, b_engine, token_ids, floors, dtype)
