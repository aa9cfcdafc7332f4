"""Routing bugs as they have shipped, planted so that rlparity's routing checks must catch them.

position_tiebreak_router: a router that breaks near-ties by the token's batch row (odd rows take the
    (k+1)-th expert instead of the k-th when the gap is under PLANTED_TIE_GAP), as a kernel that splits
    the batch across workers with different reduction orders would; caught by batch invariance.
IgnoringReplay: a replay that accepts the routes and changes nothing (the option is set on a config the
    forward never reads); caught by the replay check.
DetachedWeightsReplay: a replay that forces the routes but computes the routing weights without
    autograd, so the routers train on nothing; caught by the replay check's gradient condition.
fused_moe_blocks: MoE blocks that route without calling their router module (a fused kernel), where a
    router replay cannot take effect; RouterReplay must refuse to pass for one.
"""

import contextlib

import torch

from rlparity.routing.layers import router_layers
from rlparity.routing.replay import RouterReplay

# Far above float32 rounding of the router logits (~1e-5 on micro and tiny), yet a near-tie in the data:
# 2-17 % of the micro model's tokens per layer have a smaller gap.
PLANTED_TIE_GAP = 1e-2


@contextlib.contextmanager
def position_tiebreak_router(model: torch.nn.Module, tie_gap: float = PLANTED_TIE_GAP):
    seq_len = {}

    def remember_shape(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seq_len["S"] = ids.shape[1]

    def planted_forward(router):
        def forward(hidden_states):
            logits = torch.nn.functional.linear(hidden_states, router.weight, router.bias)
            values, ids = torch.topk(logits, router.top_k + 1, dim=-1)
            rows = torch.arange(hidden_states.shape[0], device=ids.device) // seq_len["S"]
            swap = ((values[:, -2] - values[:, -1]) < tie_gap) & (rows % 2 == 1)
            chosen = ids[:, :-1].clone()
            chosen[swap, -1] = ids[swap, -1]
            weights = torch.softmax(logits.gather(1, chosen), dim=1)
            return logits, weights, chosen
        return forward

    handle = model.register_forward_pre_hook(remember_shape, with_kwargs=True)
    layers = router_layers(model)
    for layer in layers:
        layer.router.forward = planted_forward(layer.router)
    try:
        yield model
    finally:
        handle.remove()
        for layer in layers:
            del layer.router.forward


class IgnoringReplay:
    def __init__(self, model, routes, lengths, padded_len=None):
        self.model, self.routes = model, routes

    def __enter__(self):
        self.model.config.router_replay = self.routes  # nothing reads it
        return self

    def __exit__(self, *exc_info):
        del self.model.config.router_replay


class DetachedWeightsReplay(RouterReplay):
    def _router_forward(self, layer, original):
        forced = super()._router_forward(layer, original)

        def forward(hidden_states):
            logits, weights, ids = forced(hidden_states)
            return logits, weights.detach(), ids

        return forward


@contextlib.contextmanager
def fused_moe_blocks(model: torch.nn.Module):
    """Each MoE block routes by itself, never calling its router module (as a fused MoE kernel does), so a
    replay that patches the router cannot take effect; RouterReplay must say so."""

    def fused(mlp):
        def forward(hidden_states):
            batch, seq, hidden = hidden_states.shape
            flat = hidden_states.reshape(-1, hidden)
            logits = torch.nn.functional.linear(flat, mlp.router.weight, mlp.router.bias)
            values, ids = torch.topk(logits, mlp.router.top_k, dim=-1)
            out = mlp.experts(flat, ids, torch.softmax(values, dim=1))
            return out.reshape(batch, seq, hidden), None
        return forward

    blocks = [layer.mlp for layer in model.model.layers]
    for mlp in blocks:
        mlp.forward = fused(mlp)
    try:
        yield model
    finally:
        for mlp in blocks:
            del mlp.forward
