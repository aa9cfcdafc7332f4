"""Router replay on the micro model: it takes effect, keeps the routers' gradients, refuses bad routes,
and fails loudly where it cannot take effect."""

import pytest
import torch

from rlparity.engines import open_engine
from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.routing.checks import runner_up_routes
from rlparity.routing.forward import pad_batch, run_pass
from rlparity.routing.layers import router_layers
from rlparity.routing.replay import RouterReplay, replayed_pass
from tests.conftest import language_sequences
from tests.planted_routing import fused_moe_blocks

LENGTHS = (40, 29, 35)


@pytest.fixture(scope="module")
def hf(micro_checkpoint):
    return open_engine("hf", micro_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def sequences(hf):
    return language_sequences(hf.config["vocab_size"], LENGTHS, seed=11)


@pytest.fixture(scope="module")
def own(hf, sequences):
    return run_pass(hf.model, sequences, hf.pad_id, train=False, grad=False)


def lengths_of(sequences):
    return [len(sequence) for sequence in sequences]


def test_replay_forces_routes_that_differ_from_the_models_own_at_every_token(hf, sequences, own):
    forced = runner_up_routes(own.routing)
    for got, mine in zip(forced, own.routing):
        for a, b in zip(got.expert_ids, mine.expert_ids):
            assert (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1).all()
    out = replayed_pass(hf.model, sequences, hf.pad_id, forced, train=False, grad=False)
    for got, want in zip(out.routing, forced):
        assert all(torch.equal(a, b) for a, b in zip(got.expert_ids, want.expert_ids))
    assert not all(torch.equal(a, b) for a, b in zip(out.logprobs, own.logprobs))


def test_replay_of_the_models_own_routes_changes_nothing(hf, sequences, own):
    out = replayed_pass(hf.model, sequences, hf.pad_id, own.routing, train=False, grad=False)
    assert all(torch.equal(a, b) for a, b in zip(out.logprobs, own.logprobs))


def test_replay_report_counts_every_forced_token(hf, sequences, own):
    replay = RouterReplay(hf.model, own.routing, lengths_of(sequences))
    with replay:
        run_pass(hf.model, sequences, hf.pad_id, train=False, grad=False)
    assert [(s.router_calls, s.experts_calls, s.forced_tokens, s.mismatches) for s in replay.report] == \
        [(1, 1, sum(LENGTHS), 0)] * len(router_layers(hf.model))


def test_routers_get_gradients_through_the_routing_weights(hf, sequences, own):
    out = replayed_pass(hf.model, sequences, hf.pad_id, runner_up_routes(own.routing), train=True, grad=True)
    hf.model.zero_grad(set_to_none=True)
    (-torch.cat(out.logprobs).sum()).backward()
    try:
        for layer in router_layers(hf.model):
            assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().max() > 0
            assert layer.router.bias.grad.abs().max() > 0
    finally:
        hf.model.zero_grad(set_to_none=True)


def test_the_router_is_restored_after_the_block_even_on_error(hf, sequences, own):
    with pytest.raises(RuntimeError, match="boom"):
        with RouterReplay(hf.model, own.routing, lengths_of(sequences)):
            raise RuntimeError("boom")
    assert all("forward" not in layer.router.__dict__ for layer in router_layers(hf.model))
    again = run_pass(hf.model, sequences, hf.pad_id, train=False, grad=False)
    assert all(torch.equal(a, b) for a, b in zip(again.logprobs, own.logprobs))


def test_a_replay_with_no_forward_inside_fails(hf, sequences, own):
    with pytest.raises(RlparityError, match="did not take effect: layer 0: its experts never ran"):
        with RouterReplay(hf.model, own.routing, lengths_of(sequences)):
            pass


def test_a_replay_on_moe_blocks_that_bypass_the_router_fails(hf, sequences, own):
    ids, mask = pad_batch(sequences, hf.pad_id)
    with fused_moe_blocks(hf.model), torch.no_grad():
        with pytest.raises(RlparityError, match="did not take effect: layer 0: .* the router was never called"):
            with RouterReplay(hf.model, runner_up_routes(own.routing), lengths_of(sequences)):
                hf.model(input_ids=ids, attention_mask=mask)


def test_a_replay_for_another_batch_fails_at_the_router(hf, sequences, own):
    with pytest.raises(RlparityError, match=r"received 120 token rows, the recorded routes are for 2 sequences x 40"):
        with RouterReplay(hf.model, own.routing[:2], lengths_of(sequences)[:2]):
            run_pass(hf.model, sequences, hf.pad_id, train=False, grad=False)


def edited(routes, sequence=0, layer=0, ids=None, layers=None):
    out = [Routing(list(r.expert_ids), r.router_logits) for r in routes]
    if layers is not None:
        out[sequence].expert_ids = out[sequence].expert_ids[:layers]
    if ids is not None:
        out[sequence].expert_ids[layer] = ids(out[sequence].expert_ids[layer])
    return out


@pytest.mark.parametrize("make, lengths, message", [
    (lambda r: r[:2], LENGTHS, "2 recorded routes for a batch of 3 sequences"),
    (lambda r: edited(r, layers=1), LENGTHS, "sequence 0 has routes for 1 layers, the model has 2"),
    (lambda r: edited(r, ids=lambda x: x[:-1]), LENGTHS, r"shape \(39, 2\), expected \[40 tokens, 2\]"),
    (lambda r: r, (41, 29, 35), r"shape \(40, 2\), expected \[41 tokens, 2\]"),
    (lambda r: edited(r, ids=lambda x: x[:, :1]), LENGTHS, "recorded 1 experts per token, the model routes each "
                                                           "token to top_k = 2"),
    (lambda r: edited(r, layer=1, ids=lambda x: x + 4), LENGTHS, r"expert id \d+ is outside \[0, 4\)"),
    (lambda r: edited(r, ids=lambda x: x - 4), LENGTHS, r"expert id -\d is outside \[0, 4\)"),
    (lambda r: edited(r, ids=lambda x: x[:, :1].repeat(1, 2)), LENGTHS, "expected 2 distinct experts"),
    (lambda r: edited(r, ids=lambda x: x.float()), LENGTHS, "expert ids must be integers, got torch.float32"),
])
def test_bad_routes_are_refused(hf, own, make, lengths, message):
    with pytest.raises(RlparityError, match=message):
        RouterReplay(hf.model, make(own.routing), lengths)


def test_a_model_without_gpt_oss_routers_is_refused():
    with pytest.raises(RlparityError, match="expected a transformers GPT-OSS model"):
        RouterReplay(torch.nn.Linear(2, 2), [], [])


@pytest.fixture
def checkpointed(hf):
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    model = hf.model
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    yield model
    disable()
    model.eval()


def test_under_activation_checkpointing_replay_needs_backward_inside_the_block(checkpointed, sequences, own):
    ids, mask = pad_batch(sequences, 0)
    checkpointed.train()
    with pytest.raises(RlparityError, match="activation checkpointing is on"):
        with RouterReplay(checkpointed, runner_up_routes(own.routing), lengths_of(sequences)):
            checkpointed(input_ids=ids, attention_mask=mask, use_cache=False)
    replay = RouterReplay(checkpointed, runner_up_routes(own.routing), lengths_of(sequences), backward_inside=True)
    with replay:
        checkpointed(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().logsumexp(-1).sum().backward()
    # every layer's experts ran twice (forward, then the recomputation in backward), both times on the replayed ids
    assert [(state.experts_calls, state.mismatches) for state in replay.report] == [(2, 0)] * len(replay.report)
    assert all(layer.router.weight.grad.abs().max() > 0 for layer in router_layers(checkpointed))
    checkpointed.zero_grad(set_to_none=True)
