"""The router alone in bfloat16 vs float32: the same hidden states entering each router, its linear map
computed once in float32 and once with inputs, weight and bias rounded to bfloat16.

This isolates the router's own precision from everything upstream (a whole-model bf16 vs fp32
comparison mixes in the attention's and experts' rounding): it answers "an engine that computes the
router in bf16 while the trainer computes it in fp32 would route how many tokens differently?".
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rlparity.engines.base import Routing
from rlparity.routing.agreement import RoutingComparison, compare_routing
from rlparity.routing.forward import pad_batch, run_pass
from rlparity.routing.layers import router_layers


def router_logits_in(router: torch.nn.Module, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """hidden [T, H] -> logits [T, E] computed in `dtype` (inputs and parameters rounded to it)."""
    return F.linear(hidden.to(dtype), router.weight.detach().to(dtype), router.bias.detach().to(dtype))


def router_precision(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int,
                     high: torch.dtype = torch.float32, low: torch.dtype = torch.bfloat16,
                     where: str = "") -> RoutingComparison:
    """Routes from each layer's router run in `high` vs in `low` on the hidden states the model fed it;
    `where` names the model in the comparison's side names."""
    layers = router_layers(model)
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(index):
        def hook(module, args):
            inputs[index] = args[0].detach()
        return hook

    handles = [layer.router.register_forward_pre_hook(keep_input(layer.index)) for layer in layers]
    try:
        run_pass(model, token_ids, pad_id, train=False, grad=False)
    finally:
        for handle in handles:
            handle.remove()
    lengths = [len(sequence) for sequence in token_ids]
    padded = pad_batch(token_ids, pad_id)[0].shape[1]
    routes = {dtype: [Routing([], []) for _ in lengths] for dtype in (high, low)}
    for layer in layers:
        for dtype in (high, low):
            logits = router_logits_in(layer.router, inputs[layer.index], dtype)
            ids = torch.topk(logits, layer.top_k, dim=-1).indices
            for row, length in enumerate(lengths):
                span = slice(row * padded, row * padded + length)
                routes[dtype][row].expert_ids.append(ids[span])
                routes[dtype][row].router_logits.append(logits[span])
    name = lambda dtype: f"router[{str(dtype).removeprefix('torch.')}]" + (f" in {where}" if where else "")
    return compare_routing(routes[high], routes[low], dtype=low, names=(name(high), name(low)))
