"""Replay variants (rlparity.routing.variants) on the micro model: hf bfloat16 as the trainer, the float64 reference
as the engine. Each variant does what it says, and a variant that silently does nothing fails its check."""

import pytest
import torch

from rlparity.engines import open_engine
from rlparity.results import FAIL, PASS
from rlparity.routing.checks import runner_up_routes
from rlparity.routing.engines import engine_routes
from rlparity.routing.forward import run_pass
from rlparity.routing.replay import RouterReplay
from rlparity.routing.variants import (
    VARIANTS,
    check,
    engine_weights,
    measure_variant,
    reversed_slots,
    variant_table,
)
from tests.conftest import language_sequences

LENGTHS = (40, 29, 35)


@pytest.fixture(scope="module")
def hf(micro_checkpoint):
    return open_engine("hf", micro_checkpoint, dtype="bfloat16")


@pytest.fixture(scope="module")
def sequences(hf):
    return language_sequences(hf.config["vocab_size"], LENGTHS, seed=11)


@pytest.fixture(scope="module")
def engine(reference_micro, sequences):
    return (engine_routes(reference_micro, sequences), reference_micro.logprobs(sequences, [1] * len(sequences)))


@pytest.fixture(scope="module")
def results(hf, sequences, engine):
    routes, logprobs = engine
    return {variant: measure_variant(hf.model, sequences, hf.pad_id, variant, "reference", routes, logprobs)
            for variant in VARIANTS}


def test_every_variant_passes_its_check(results):
    for result in results.values():
        record = check(result, "hf[bfloat16] vs reference", "bfloat16")
        assert record.verdict == PASS, (result.variant, record.reason)
    assert len(variant_table(results.values())) == 1 + len(VARIANTS)


def test_forced_variants_route_as_the_engine_and_free_ones_do_not(results):
    for variant in ("ids", "ids-reversed", "ids+weights"):
        assert results[variant].route_agreement == 1.0 and results[variant].forced_mismatches == 0
    assert results["none"].route_agreement < 1.0  # bf16 against float64 flips some routes: replay has work to do
    assert results["none"].forced_mismatches is None


def test_r2_makes_the_ratio_routes_agree_and_only_engine_weights_cut_the_router_gradient(results):
    assert results["r2"].forced_mismatches == 0
    assert results["ids+weights"].router_grad_norm == 0.0
    assert all(results[v].router_grad_norm > 0 for v in ("none", "ids", "ids-reversed", "r2"))


def test_the_slot_order_does_not_reach_transformers_experts(results):
    """transformers' GPT-OSS experts accumulate by expert, not by slot: the same ids in reverse give the same pass."""
    ids, reversed_ = results["ids"], results["ids-reversed"]
    assert (reversed_.dlogp_mean, reversed_.dlogp_max, reversed_.router_grad_norms) == (
        ids.dlogp_mean, ids.dlogp_max, ids.router_grad_norms)


def test_engine_weights_are_the_top_k_softmax_of_the_engines_logits(engine):
    routes, _ = engine
    weights = engine_weights(routes)
    first = weights[0][0]
    assert torch.allclose(first.sum(-1), torch.ones(first.shape[0], dtype=first.dtype))
    chosen = routes[0].router_logits[0].float().gather(1, routes[0].expert_ids[0].long())
    assert torch.equal(first.argmax(-1), chosen.argmax(-1))


def test_reversed_slots_reverse_each_token(engine):
    routes, _ = engine
    assert torch.equal(reversed_slots(routes)[1].expert_ids[-1], routes[1].expert_ids[-1].flip(-1))


def test_a_check_fails_when_forced_routes_did_not_run_or_gradients_are_wrong(results):
    broken = results["ids"].__class__(**{**results["ids"].__dict__, "forced_mismatches": 3})
    assert check(broken, "hf", "bfloat16").verdict == FAIL
    no_gradient = results["ids"].__class__(**{**results["ids"].__dict__, "router_grad_norms": [0.0, 1.0]})
    assert "layers [0] got no" in check(no_gradient, "hf", "bfloat16").reason
    weights_ignored = results["ids+weights"].__class__(**{**results["ids+weights"].__dict__,
                                                          "router_grad_norms": [0.5, 0.0]})
    assert "got a gradient although" in check(weights_ignored, "hf", "bfloat16").reason


def test_replayed_engine_weights_reach_the_experts(hf, sequences, engine):
    """The weights the experts are handed are the engine's, not the router's own."""
    routes = runner_up_routes(run_pass(hf.model, sequences, hf.pad_id, train=False, grad=False).routing)
    weights = [[torch.full(ids.shape, 0.5) for ids in routing.expert_ids] for routing in routes]
    seen = []
    experts = hf.model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append(args[2].detach().float()))
    try:
        with RouterReplay(hf.model, routes, LENGTHS, weights=weights):
            run_pass(hf.model, sequences, hf.pad_id, train=False, grad=False)
    finally:
        handle.remove()
    rows = seen[0].reshape(len(LENGTHS), max(LENGTHS), -1)
    assert all(torch.equal(rows[i, :length], torch.full((length, rows.shape[-1]), 0.5))
               for i, length in enumerate(LENGTHS))
