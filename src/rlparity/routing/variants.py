"""Router replay as RL trainers run it, measured side by side on one batch against one engine.

    none           no replay: the log-prob pass and the training pass each route on their own
    ids            the engine's expert ids forced in both passes, routing weights from the trainer's router
                   (softmax of its own logits at those ids, so the router keeps its gradient): RouterReplay
    ids-reversed   the same, each token's k ids handed over in reverse slot order (weights follow their ids):
                   whether the order in which an engine lists its experts reaches the trainer's result
    ids+weights    the engine's ids and its routing weights (GPT-OSS's top-k softmax of the engine's own router
                   logits, in float32): constants, so the router gets no gradient
    r2             routes recorded in the trainer's own log-prob pass (eval, no grad), replayed in its training
                   pass (train, grad): the PPO ratio's routes agree by construction, the engine's need not

Per variant: the training pass's |dlogp| against the engine (mean, p99, max), the fraction of tokens routed as the
engine routed them in every layer, the norm of the routers' gradient of the sequences' log-likelihood, and the PPO
ratio exp(logp_training - logp_logprob_pass) of the batch taken as the first mini-batch (its mean and its largest
|r - 1|). `check` turns one into a Record: the forced routes must be the ones the experts ran (no silent no-op),
the routers must get a finite non-zero gradient where the variant keeps it and none where it replaces the weights.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from rlparity.engines.base import Routing
from rlparity.results import FAIL, PASS, Record
from rlparity.routing.agreement import compare_routing
from rlparity.routing.forward import Pass, run_pass
from rlparity.routing.replay import forced_mismatches, replayed_pass, router_gradient_norms

VARIANTS = ("none", "ids", "ids-reversed", "ids+weights", "r2")
# `rlparity routing --replay` choices: "ids" also measures "ids-reversed" (the slot order of the same replay).
REPLAY_CHOICES = ("none", "ids", "ids+weights", "r2")
KEEPS_ROUTER_GRADIENT = {"none": True, "ids": True, "ids-reversed": True, "ids+weights": False, "r2": True}
# Engines whose routing weights are known exactly from the routes they report: rlparity's reference computes them as
# the softmax of the top-k logits it reports (rlparity.reference.moe). vLLM's capture reports logits and ids only.
WEIGHTS_KNOWN = ("reference",)
VLLM_NO_WEIGHTS = ("vLLM reports expert ids, not routing weights: vLLM 0.32's BaseRouter.select_experts hands only "
                   "topk_ids to its capture callback (the routed-experts capture of enable_return_routed_experts "
                   "too), so ids+weights is measured against the reference only")
PROPERTY = "routing.replay_variant"


@dataclass
class VariantResult:
    variant: str
    engine: str
    dlogp_mean: float  # |logp_training - logp_engine| over the batch's tokens
    dlogp_p99: float
    dlogp_max: float
    route_agreement: float  # fraction of tokens routed to the engine's expert set in every layer
    forced_mismatches: int | None  # (token, layer) pairs whose experts ran other ids than forced; None: nothing forced
    router_grad_norms: list[float]  # per layer, of -sum(logp_training)
    ratio_mean: float  # PPO ratio exp(logp_training - logp_logprob_pass)
    ratio_max_deviation: float  # max |r - 1|

    @property
    def router_grad_norm(self) -> float:
        return math.sqrt(sum(norm * norm for norm in self.router_grad_norms))


def weights_unknown(engine: str, variant: str) -> str | None:
    """Why `variant` cannot run against `engine` (an engine name as engines report it), or None when it can."""
    if variant != "ids+weights" or engine.split("[")[0] in WEIGHTS_KNOWN:
        return None
    if engine.startswith("vllm"):
        return VLLM_NO_WEIGHTS
    return f"{engine}'s routing weights are unknown (only the reference's are exact from the routes it reports)"


def engine_weights(routes: Sequence[Routing]) -> list[list[torch.Tensor]]:
    """Each sequence's routing weights per layer [S, k], as GPT-OSS computes them from the engine's own router
    logits: a softmax over the selected experts' logits (in float32 at least)."""
    return [[torch.softmax(logits.gather(1, ids.long()).to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
             for logits, ids in zip(routing.router_logits, routing.expert_ids)] for routing in routes]


def reversed_slots(routes: Sequence[Routing]) -> list[Routing]:
    return [Routing([ids.flip(-1) for ids in routing.expert_ids], routing.router_logits) for routing in routes]


def variant_passes(model, token_ids, pad_id, variant: str, engine_routes: Sequence[Routing]
                   ) -> tuple[Pass, Pass, list[Routing] | None]:
    """(log-prob pass, training pass, the routes forced in the training pass or None)."""
    if variant == "none":
        return (run_pass(model, token_ids, pad_id, train=False, grad=False),
                run_pass(model, token_ids, pad_id, train=True, grad=True), None)
    if variant == "r2":
        logprob_pass = run_pass(model, token_ids, pad_id, train=False, grad=False)
        return logprob_pass, replayed_pass(model, token_ids, pad_id, logprob_pass.routing, train=True,
                                           grad=True), logprob_pass.routing
    routes = reversed_slots(engine_routes) if variant == "ids-reversed" else list(engine_routes)
    options = {"weights": engine_weights(engine_routes)} if variant == "ids+weights" else {}
    return (replayed_pass(model, token_ids, pad_id, routes, train=False, grad=False, **options),
            replayed_pass(model, token_ids, pad_id, routes, train=True, grad=True, **options), routes)


def measure_variant(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, variant: str,
                    engine: str, engine_routes: Sequence[Routing],
                    engine_logprobs: Sequence[torch.Tensor]) -> VariantResult:
    """engine_logprobs[i]: log p(token_t | tokens_<t) for t >= 1 of sequence i, as the engine computed them."""
    if variant not in VARIANTS:
        raise ValueError(f"replay variant {variant!r}, expected one of {VARIANTS}")
    logprob_pass, training, forced = variant_passes(model, token_ids, pad_id, variant, engine_routes)
    trained = torch.cat([v.detach().double().cpu() for v in training.logprobs])
    delta = (trained - torch.cat([v.double().cpu() for v in engine_logprobs])).abs()
    ratio = torch.exp(trained - torch.cat([v.double().cpu() for v in logprob_pass.logprobs]))
    dtype = next(model.parameters()).dtype
    agreement = compare_routing(engine_routes, training.routing, dtype=dtype, names=(engine, "training pass"))
    return VariantResult(
        variant, engine, delta.mean().item(), torch.quantile(delta, 0.99).item(), delta.max().item(),
        1 - agreement.differ_any_layer, None if forced is None else forced_mismatches(training.routing, forced),
        router_gradient_norms(model, -torch.cat(training.logprobs).sum()), ratio.mean().item(),
        (ratio - 1).abs().max().item())


def check(result: VariantResult, subject: str, dtype: str, shapes: dict | None = None) -> Record:
    """What must hold of a variant: forced routes ran exactly; router gradients where the variant keeps them."""
    problems = []
    if result.forced_mismatches:
        problems.append(f"{result.forced_mismatches} (token, layer) pairs ran other experts than the replay forced")
    norms = result.router_grad_norms
    if KEEPS_ROUTER_GRADIENT[result.variant]:
        if bad := [i for i, norm in enumerate(norms) if not (norm > 0 and math.isfinite(norm))]:
            problems.append(f"the routers of layers {bad} got no (or a non-finite) gradient")
    elif bad := [i for i, norm in enumerate(norms) if norm != 0]:
        problems.append(f"the routers of layers {bad} got a gradient although the engine's weights replaced theirs "
                        f"(were the weights replayed?)")
    return Record(PROPERTY, subject, result.variant, dtype, FAIL if problems else PASS, error=result.dlogp_mean,
                  reason="; ".join(problems), shapes=shapes or {},
                  extra=asdict(result) | {"router_grad_norm": result.router_grad_norm})


def variant_table(results: Sequence[VariantResult]) -> list[str]:
    lines = [f"{'replay':<13} {'engine':<22} {'mean|dlogp|':>11} {'p99':>9} {'max':>9} {'routes=eng':>10} "
             f"{'router |grad|':>13} {'ratio mean':>11} {'max|r-1|':>9}"]
    for r in results:
        lines.append(f"{r.variant:<13} {r.engine:<22} {r.dlogp_mean:>11.3e} {r.dlogp_p99:>9.2e} {r.dlogp_max:>9.2e} "
                     f"{r.route_agreement:>10.2%} {r.router_grad_norm:>13.3e} {r.ratio_mean:>11.6f} "
                     f"{r.ratio_max_deviation:>9.2e}")
    return lines
