"""The closed-form model against transformers' parameter counts and against the tracker.

Saved activations are counted op by op, so they must agree exactly; phase peaks within the validated
tolerance (rlparity.memory.ceilings.VALIDATION_TOLERANCE).
"""

import pytest
import torch

from rlparity.errors import RlparityError
from rlparity.memory import TrackedMeter, analytic
from rlparity.memory.ceilings import VALIDATION_TOLERANCE
from rlparity.memory.configs import model_config
from rlparity.memory.dims import Dims, layer_parameters, parameter_tensors, parameters, root_parameters
from rlparity.memory.fake import META, decoder_layer, gpt_oss_config, position_embeddings
from rlparity.memory.steps import eager_mask, layer_step, logprob_step, policy_loss, random_model, train_step
from rlparity.ops import logprobs_and_entropy

# micro's layout with hidden and intermediate sizes apart from each other and from Hq x D, so that a term
# counted with the wrong one of them shows
DISTINCT = {"hidden_size": 96, "intermediate_size": 160}


def _within(measured: int, estimated: int) -> bool:
    return abs(measured - estimated) <= VALIDATION_TOLERANCE * measured


@pytest.mark.parametrize("name", ["micro", "tiny", "gpt-oss-20b", "gpt-oss-120b"])
def test_parameter_counts_match_transformers(name):
    config = model_config(name)
    d = Dims.of(config)
    hf_config = gpt_oss_config(config, attention="eager", experts="eager")
    layer = decoder_layer(hf_config, layer_index=0, dtype=torch.bfloat16)  # meta: real size costs nothing
    assert sum(p.numel() for p in layer.parameters()) == layer_parameters(d)
    assert len(list(layer.parameters())) * d.layers + 3 == parameter_tensors(d)
    assert root_parameters(d) == 2 * d.vocab * d.hidden + d.hidden
    if name in ("micro", "tiny"):
        model = random_model(config, attention="eager", experts="eager", dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == parameters(d)


def _layer(attention, device, tokens):
    config = model_config("micro") | DISTINCT
    hf_config = gpt_oss_config(config, attention=attention, experts="rlparity_grouped")
    layer = decoder_layer(hf_config, layer_index=1, dtype=torch.bfloat16, device=device)
    mask = eager_mask(tokens, torch.bfloat16, device) if attention == "eager" else None
    report = layer_step(TrackedMeter(device), layer, position_embeddings(hf_config, tokens, torch.bfloat16, device),
                        tokens, mask)
    return report, analytic.layer_step_estimate(config, tokens, torch.bfloat16, attention)


@pytest.mark.parametrize("tokens", [64, 96])
@pytest.mark.parametrize("attention,device", [("eager", META), ("triton", META), ("fa3", META),
                                              ("chunked", torch.device("cpu"))],
                         ids=["eager", "triton", "fa3", "chunked"])
def test_one_layer_matches_the_tracker(attention, device, tokens):
    report, estimate = _layer(attention, device, tokens)
    measured = report.saved_activations()
    measured.pop("other")  # the layer's output, held by the caller
    assert measured == estimate.saved_activations()
    assert report.end_of["backward"]["gradients"] == estimate.categories["gradients"]
    for phase, peak in estimate.phase_peak.items():
        assert _within(report.phase_peak[phase], peak), (phase, report.phase_peak[phase], peak)


@pytest.mark.parametrize("chunk", [None, 16, 1000], ids=["naive", "chunk16", "chunk_over"])
def test_logprob_pass_matches_the_tracker(chunk):
    d = Dims.of(model_config("micro"))
    tokens = 80
    hidden = torch.empty(tokens, d.hidden, dtype=torch.bfloat16, device=META, requires_grad=True)
    weight = torch.empty(d.vocab, d.hidden, dtype=torch.bfloat16, device=META, requires_grad=True)
    targets = torch.empty(tokens, dtype=torch.long, device=META)
    report = logprob_step(TrackedMeter(META), hidden, weight, targets, chunk)
    estimate = analytic.logprob_step_estimate(model_config("micro"), tokens, torch.bfloat16, chunk)
    assert report.saved_activations() == estimate.saved_activations()
    for phase, peak in estimate.phase_peak.items():
        assert _within(report.phase_peak[phase], peak), (phase, report.phase_peak[phase], peak)


def _warm(model, optimizer, input_ids, chunk):
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
    logp, entropy = logprobs_and_entropy(hidden, model.lm_head.weight, input_ids[0, 1:], chunk or hidden.shape[0])
    policy_loss(logp, entropy).backward()
    optimizer.step()


@pytest.mark.parametrize("attention,chunk,checkpointing", [
    ("chunked", 32, False), ("eager", 32, False), ("chunked", None, False), ("chunked", 32, True)],
    ids=["chunked", "eager", "naive_logprobs", "checkpointing"])
def test_training_step_matches_the_tracker(attention, chunk, checkpointing):
    config, tokens = model_config("micro"), 128
    model = random_model(config, attention=attention, experts="rlparity_grouped", dtype=torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable()  # torch.utils.checkpoint, non-reentrant
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    input_ids = torch.randint(0, config["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    _warm(model, optimizer, input_ids, chunk)
    report = train_step(TrackedMeter(), model, optimizer, input_ids, chunk)
    estimate = analytic.estimate(analytic.Workload(config, tokens, attention=attention, logprob_chunk=chunk,
                                                   checkpointing=checkpointing, optimizer_foreach=False))
    for category, phase in (("weights", "forward"), ("optimizer_state", "forward"), ("gradients", "backward")):
        assert report.end_of[phase][category] == estimate.categories[category], category
    if not checkpointing:  # checkpointed inputs are allocated by the residual adds: no module kind to compare by
        assert report.saved_activations() == estimate.saved_activations()
    for phase, peak in estimate.phase_peak.items():
        assert _within(report.phase_peak[phase], peak), (phase, report.phase_peak[phase], peak)


def test_fsdp_shards_the_static_state():
    config = model_config("gpt-oss-20b")
    one = analytic.estimate(analytic.Workload(config, 4096, world=1))
    sixteen = analytic.estimate(analytic.Workload(config, 4096, world=16))
    total = parameters(Dims.of(config))
    assert one.categories["weights"] == 2 * total  # bf16, unsharded
    assert sixteen.categories["weights"] == 4 * -(-total // 16)  # float32 shards
    assert sixteen.categories["fsdp_gather"] > 0 == one.categories["fsdp_gather"]


@pytest.mark.parametrize("change,match", [
    (dict(dtype=torch.float32), "covers 16-bit compute"),
    (dict(attention="flash2"), "no memory model for attention 'flash2'"),
    (dict(tokens=1), "expected at least 2 tokens"),
    (dict(config={"hidden_size": 8}), "GPT-OSS config is missing 'num_hidden_layers'"),
])
def test_bad_workloads_name_what_was_expected(change, match):
    workload = dict(config=model_config("micro"), tokens=64) | change
    with pytest.raises(RlparityError, match=match):
        analytic.estimate(analytic.Workload(**workload))
