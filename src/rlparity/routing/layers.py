"""Where routing lives in transformers' GPT-OSS: each decoder layer's `mlp.router` (logits, top-k) and
`mlp.experts` (which runs the ids it is handed). Both capture and replay go through this one lookup, so
a model of another shape is refused here, by name, instead of being silently not hooked."""

from dataclasses import dataclass

import torch

from rlparity.errors import RlparityError


@dataclass(frozen=True)
class RouterLayer:
    index: int
    router: torch.nn.Module  # forward(hidden [T, H]) -> (logits [T, E], weights [T, k], ids [T, k])
    experts: torch.nn.Module  # forward(hidden [T, H], ids [T, k], weights [T, k]) -> [T, H]
    top_k: int
    num_experts: int


def router_layers(model: torch.nn.Module) -> list[RouterLayer]:
    """The router and experts of every decoder layer of a GptOssForCausalLM (or its inner GptOssModel)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RlparityError(f"routing: expected a transformers GPT-OSS model with .model.layers, got "
                            f"{type(model).__name__}")
    found = []
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        router, experts = getattr(mlp, "router", None), getattr(mlp, "experts", None)
        if router is None or experts is None or not hasattr(router, "top_k") or not hasattr(router, "weight"):
            raise RlparityError(f"routing: layer {index} has no GPT-OSS router (expected layer.mlp.router with weight "
                                f"and top_k, and layer.mlp.experts); got mlp {type(mlp).__name__}")
        found.append(RouterLayer(index, router, experts, int(router.top_k), int(router.weight.shape[0])))
    if not found:
        raise RlparityError(f"routing: {type(model).__name__} has no decoder layers")
    return found


def experts_ids_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    """The expert ids an experts module was called with: GptOssMLP passes (hidden, ids, weights)."""
    if len(args) > 1:
        return args[1]
    if "router_indices" in kwargs:
        return kwargs["router_indices"]
    raise RlparityError(f"routing: the experts module was called without expert ids (positional args "
                        f"{len(args)}, keywords {sorted(kwargs)}); expected (hidden_states, router_indices, ...)")
