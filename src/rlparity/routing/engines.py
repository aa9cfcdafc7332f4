"""Engines whose routes can be compared, opened by name: hf (transformers, the trainer side), reference
(rlparity's float64 GPT-OSS), vllm (in its own process; rlparity.engines.vllm), and a user's engine registered with
--engine NAME=module:Class whose class has routing(token_ids) (rlparity.engines.user).

Every one of them records routing itself: hf with forward hooks on its routers, reference from its own
forward, vllm through the router's capture callback inside the engine process (vLLM 0.32's
`enable_return_routed_experts` needs Model Runner V2, which the CPU build refuses; `info` says why).
An engine that cannot run here raises EngineUnavailable (an RlparityError): nothing can be compared.
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from rlparity.engines import EngineUnavailable, engine_class, is_user_engine, open_engine, routes
from rlparity.engines.base import Routing
from rlparity.errors import RlparityError

ROUTING_ENGINES = ("hf", "reference", "vllm")
DEFAULT_DTYPES = {"hf": "float32", "reference": "float64", "vllm": "float32"}
USER_ENGINE_DTYPE = "float32"
REFERENCE_DTYPES = {"float64": torch.float64, "fp64": torch.float64, "float32": torch.float32, "fp32": torch.float32}
USER_ENGINE_DTYPES = {**REFERENCE_DTYPES, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def vllm_unavailable_reason() -> str | None:
    from rlparity.engines.vllm import unavailable_reason

    return unavailable_reason()


def open_routing_engine(name: str, checkpoint: Path | str, dtype: str | None = None, max_len: int | None = None,
                        **options):
    """An engine that has `routing(token_ids)`, in `dtype` (default: DEFAULT_DTYPES, USER_ENGINE_DTYPE for a user's);
    `options` go to its constructor (e.g. vllm's tensor_parallel_size)."""
    require_routing_engine(name)
    if is_user_engine(name):
        return open_user_routing_engine(name, checkpoint, dtype or USER_ENGINE_DTYPE, max_len, **options)
    dtype = dtype or DEFAULT_DTYPES[name]
    if name == "reference":
        if dtype not in REFERENCE_DTYPES:
            raise RlparityError(f"routing: the reference engine runs in {sorted(REFERENCE_DTYPES)}, got {dtype!r}")
        engine = open_engine("reference", checkpoint, dtype=REFERENCE_DTYPES[dtype], max_len=max_len, **options)
    elif name == "hf":
        engine = open_engine("hf", checkpoint, dtype=dtype, max_len=max_len, **options)
    else:
        from rlparity.engines.vllm import VllmEngine

        if reason := vllm_unavailable_reason():
            raise EngineUnavailable(f"routing: the vllm engine is unavailable: {reason}")
        engine = VllmEngine(checkpoint, dtype=dtype, max_len=max_len, **options)
        if engine.info["capture"] != "available":
            engine.close()
            raise EngineUnavailable(f"routing: {engine.name} cannot record routes: {engine.info['capture']}")
    if not routes(engine):
        raise RlparityError(f"routing: engine {engine.name} has no routing(token_ids) capability")
    return engine


def require_routing_engine(name: str) -> None:
    """Refuses, before anything is opened, a name that is no routing engine: unknown, or a user's class without
    routing(token_ids)."""
    if is_user_engine(name):
        if not routes(engine_class(name)):
            raise RlparityError(f"routing: engine {name!r} has no routing(token_ids) method; rlparity routing needs "
                                f"one that returns rlparity.engines.Routing (expert ids and router logits per layer)")
    elif name not in ROUTING_ENGINES:
        raise RlparityError(f"routing: unknown engine {name!r}; expected one of {ROUTING_ENGINES}, or yours with "
                            f"--engine NAME=module:Class")


def open_user_routing_engine(name: str, checkpoint: Path | str, dtype: str, max_len: int | None, **options):
    if dtype not in USER_ENGINE_DTYPES:
        raise RlparityError(f"routing: dtype {dtype!r} of engine {name!r}: expected one of "
                            f"{sorted(USER_ENGINE_DTYPES)}")
    try:
        return open_engine(name, checkpoint, dtype=USER_ENGINE_DTYPES[dtype], max_len=max_len, **options)
    except EngineUnavailable as exc:
        raise EngineUnavailable(f"routing: {exc}") from exc


def engine_routes(engine, token_ids: Sequence[Sequence[int]]) -> list[Routing]:
    """One Routing per sequence, each sequence run alone (no batching enters the routes)."""
    routes = [engine.routing(list(sequence)) for sequence in token_ids]
    for i, (routing, sequence) in enumerate(zip(routes, token_ids)):
        if routing.router_logits is None:
            raise RlparityError(f"routing: {engine.name} returned no router logits for sequence {i}")
        counts = [ids.shape[0] for ids in routing.expert_ids]
        if any(count != len(sequence) for count in counts):
            raise RlparityError(f"routing: {engine.name} returned routes for {counts} tokens per layer for sequence "
                                f"{i} of {len(sequence)} tokens")
    return routes
