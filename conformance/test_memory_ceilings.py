"""Does a bf16 RL training step on GPT-OSS stay under its memory ceiling, and do the naive paths not?

A ceiling is the closed-form estimate (rlparity.memory.analytic) plus the tolerance it is validated to
(rlparity.memory.ceilings). Three meters measure against it:

- CPU, tracked live tensors: a training step of the bundled tiny model (random weights), the model's
  categories and phase peaks compared one by one;
- meta device, tracked: one decoder layer and the log-prob pass of GPT-OSS-20B and -120B (and of your checkpoint,
  from its config.json, with --checkpoint DIR) at 8k prompt + 16k response tokens, without allocating (fused
  attention by its kernel's allocation footprint);
- CUDA (gpu-marked): a real-size GPT-OSS-20B layer and the log-prob pass, from the caching allocator,
  with an allocator snapshot written when a ceiling is exceeded.

The naive paths must exceed the ceilings their fixed counterparts meet, which shows the checks can fail:
full-vocabulary float32 logits, experts that copy weights per (token, slot) pair (transformers'
`batched_mm`), make a full-size gradient per expert (transformers' `eager` loop) or run every token
through every expert (transformers' eval path before 5.0, whose forward alone outgrows the fixed
layer's whole training step), and eager attention at long context. One record per check: error = the
measured peak in bytes, tolerance = the ceiling.
"""

import gc
from pathlib import Path

import pytest
import torch

from rlparity.memory import TrackedMeter, analytic
from rlparity.memory.ceilings import VALIDATION_TOLERANCE, ceiling, compare
from rlparity.memory.configs import folder_config, model_config
from rlparity.memory.dims import Dims
from rlparity.memory.fake import META, decoder_layer, gpt_oss_config, position_embeddings
from rlparity.memory.report import format_bytes
from rlparity.memory.steps import (
    eager_mask,
    layer_eval_forward,
    layer_step,
    logprob_step,
    policy_loss,
    random_model,
    train_step,
)
from rlparity.ops.hf import DENSE_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATION
from rlparity.ops.logprobs import logprobs_and_entropy
from rlparity.pytest_plugin import components
from rlparity.results import FAIL, PASS, Record

BF16 = torch.bfloat16
# The retrospective's GPT-OSS-20B run: 8k prompt + 16k response tokens per sequence.
LONG_CONTEXT = 8192 + 16384
LOGPROB_CHUNK = 1024  # rlparity.memory.cli's default
TINY_TOKENS, TINY_CHUNK = 256, 64
TINY_EAGER_TOKENS = 1024  # long enough for the [Hq, T, T] scores to pass the chunked path's ceiling
MANY_EXPERTS = {"num_local_experts": 32, "num_experts_per_tok": 4}  # per-expert gradients dominate at tiny size
MANY_EXPERTS_TOKENS = 64
REAL_SIZE = ("gpt-oss-20b", "gpt-oss-120b")
CATEGORY_PHASES = {"weights": "forward", "optimizer_state": "forward", "gradients": "backward"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: run `nox -s gpu_conformance` on a GPU machine")
CUDA_NAIVE_TOKENS = 4096  # the naive log-prob pass at long context would not fit an 80 GB card at all


def _record(recorder, prop, subject, case, passed, measured, limit, reason, extra=None):
    recorder.check(Record(property=prop, subject=subject, case=case, dtype="bf16", verdict=PASS if passed else FAIL,
                          error=measured, tolerance=limit, reason=reason, extra=extra or {}))


def _within_ceiling(recorder, prop, subject, case, report, estimate, categories=None):
    """The measured peak under the ceiling, and every compared quantity within the validated tolerance."""
    rows = compare(report, estimate, categories or {})
    limit = ceiling(estimate.peak)
    off = [row.describe() for row in rows if not row.within_tolerance]
    passed = report.peak <= limit and not off
    reason = "; ".join([f"peak {format_bytes(report.peak)} vs ceiling {format_bytes(limit)}", *off])
    extra = {"comparisons": {row.quantity: [row.measured, row.estimated] for row in rows},
             "report": report.as_dict(), "tolerance": VALIDATION_TOLERANCE}
    _record(recorder, prop, subject, case, passed, report.peak, limit, reason, extra)


def _exceeds_ceiling(recorder, prop, subject, case, report, fixed_estimate):
    """A naive path must exceed the ceiling its fixed counterpart is held to."""
    limit = ceiling(fixed_estimate.peak)
    passed = report.peak > limit
    reason = (f"naive peak {format_bytes(report.peak)} is {report.peak / limit:.1f}x the fixed path's ceiling "
              f"{format_bytes(limit)}" + ("" if passed else ": the check cannot tell the naive path from the fix"))
    _record(recorder, prop, subject, case, passed, report.peak, limit, reason, {"report": report.as_dict()})


# ------------------------------------------------------------------------------------------------ CPU, tracked


def _tiny_step(attention, tokens, chunk, experts=EXPERTS_IMPLEMENTATION):
    config = model_config("tiny")
    model = random_model(config, attention=attention, experts=experts, dtype=BF16)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    input_ids = torch.randint(0, config["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]  # warm-up step
    policy_loss(*logprobs_and_entropy(hidden, model.lm_head.weight, input_ids[0, 1:], chunk or tokens)).backward()
    optimizer.step()
    del hidden
    return train_step(TrackedMeter(), model, optimizer, input_ids, chunk)


@pytest.mark.parametrize("attention", ["chunked", "eager"])
def test_cpu_training_step_within_ceiling(attention, recorder):
    report = _tiny_step(attention, TINY_TOKENS, TINY_CHUNK)
    estimate = analytic.estimate(analytic.Workload(model_config("tiny"), TINY_TOKENS, attention=attention,
                                                   logprob_chunk=TINY_CHUNK, optimizer_foreach=False))
    categories = CATEGORY_PHASES | {f"activations.{kind}": "forward" for kind in estimate.saved_activations()}
    _within_ceiling(recorder, "memory.train_step", f"tiny/{attention}/{EXPERTS_IMPLEMENTATION}",
                    f"T={TINY_TOKENS},chunk={TINY_CHUNK}", report, estimate, categories)


def test_cpu_naive_logprobs_exceed_ceiling(recorder):
    d = Dims.of(model_config("tiny"))
    tokens = 2 * TINY_TOKENS
    hidden = torch.randn(tokens, d.hidden, dtype=BF16, requires_grad=True)
    weight = torch.randn(d.vocab, d.hidden, dtype=BF16, requires_grad=True)
    targets = torch.randint(0, d.vocab, (tokens,))
    report = logprob_step(TrackedMeter(), hidden, weight, targets, chunk=None)
    fixed = analytic.logprob_step_estimate(model_config("tiny"), tokens, BF16, TINY_CHUNK)
    _exceeds_ceiling(recorder, "memory.naive_exceeds.logprobs", "tiny/full_vocab_fp32",
                     f"T={tokens}", report, fixed)


def _cpu_layer(config, attention, experts, tokens):
    hf_config = gpt_oss_config(config, attention=attention, experts=experts)
    layer = decoder_layer(hf_config, layer_index=1, dtype=BF16, device=torch.device("cpu"))
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()  # routers included: distinct top-k choices across the experts
    mask = eager_mask(tokens, BF16, torch.device("cpu")) if attention == "eager" else None
    cos_sin = position_embeddings(hf_config, tokens, BF16, torch.device("cpu"))
    return layer_step(TrackedMeter(), layer, cos_sin, tokens, mask)


@pytest.mark.parametrize("experts,config_change,tokens", [
    ("eager", MANY_EXPERTS, MANY_EXPERTS_TOKENS),
    ("batched_mm", {}, TINY_TOKENS),
], ids=["eager_per_expert_gradients", "batched_mm_per_pair_weights"])
def test_cpu_naive_experts_exceed_ceiling(experts, config_change, tokens, recorder):
    config = model_config("tiny") | config_change
    report = _cpu_layer(config, "chunked", experts, tokens)
    fixed = analytic.layer_step_estimate(config, tokens, BF16, "chunked")
    _exceeds_ceiling(recorder, "memory.naive_exceeds.experts", f"tiny/transformers_{experts}",
                     f"T={tokens},E={config['num_local_experts']}", report, fixed)


def test_cpu_eager_attention_exceeds_ceiling(recorder):
    config = model_config("tiny")
    report = _cpu_layer(config, "eager", EXPERTS_IMPLEMENTATION, TINY_EAGER_TOKENS)
    fixed = analytic.layer_step_estimate(config, TINY_EAGER_TOKENS, BF16, "chunked")
    _exceeds_ceiling(recorder, "memory.naive_exceeds.attention", "tiny/eager_attention",
                     f"T={TINY_EAGER_TOKENS}", report, fixed)


# ------------------------------------------------------------------------------------------------ meta, real size


def pytest_generate_tests(metafunc):
    """The real-size models by name, and the user's checkpoint folder (a Path) when --checkpoint is given."""
    if "model" in metafunc.fixturenames:
        folder = components(metafunc.config).checkpoint
        models = [*REAL_SIZE, *([folder] if folder is not None else [])]
        metafunc.parametrize("model", models, ids=[_name(model) for model in models])


def _name(model) -> str:
    return f"checkpoint-{model.name}" if isinstance(model, Path) else model


def _config(model) -> dict:
    return folder_config(model) if isinstance(model, Path) else model_config(model)


def _meta_layer(model, attention, experts, tokens=LONG_CONTEXT):
    config = _config(model)
    hf_config = gpt_oss_config(config, attention=attention, experts=experts)
    layer = decoder_layer(hf_config, layer_index=1, dtype=BF16)
    mask = eager_mask(tokens, BF16, META) if attention == "eager" else None
    return layer_step(TrackedMeter(META), layer, position_embeddings(hf_config, tokens, BF16), tokens, mask)


def _meta_logprobs(model, chunk, tokens=LONG_CONTEXT):
    d = Dims.of(_config(model))
    hidden = torch.empty(tokens, d.hidden, dtype=BF16, device=META, requires_grad=True)
    weight = torch.empty(d.vocab, d.hidden, dtype=BF16, device=META, requires_grad=True)
    targets = torch.empty(tokens, dtype=torch.long, device=META)
    return logprob_step(TrackedMeter(META), hidden, weight, targets, chunk)


def test_meta_decoder_layer_within_ceiling(model, recorder):
    report = _meta_layer(model, "triton", EXPERTS_IMPLEMENTATION)
    estimate = analytic.layer_step_estimate(_config(model), LONG_CONTEXT, BF16, "triton")
    categories = {"gradients": "backward"} | {f"activations.{k}": "forward" for k in estimate.saved_activations()}
    _within_ceiling(recorder, "memory.layer", f"{_name(model)}/triton/{EXPERTS_IMPLEMENTATION}",
                    f"T={LONG_CONTEXT}", report, estimate, categories)


def test_meta_logprob_pass_within_ceiling(model, recorder):
    report = _meta_logprobs(model, LOGPROB_CHUNK)
    estimate = analytic.logprob_step_estimate(_config(model), LONG_CONTEXT, BF16, LOGPROB_CHUNK)
    _within_ceiling(recorder, "memory.logprob_pass", f"{_name(model)}/chunked_logprobs",
                    f"T={LONG_CONTEXT},chunk={LOGPROB_CHUNK}", report, estimate,
                    {"activations.logprob": "forward", "gradients": "backward"})


def test_meta_naive_logprobs_exceed_ceiling(recorder):
    model = "gpt-oss-20b"
    report = _meta_logprobs(model, chunk=None)
    fixed = analytic.logprob_step_estimate(model_config(model), LONG_CONTEXT, BF16, LOGPROB_CHUNK)
    _exceeds_ceiling(recorder, "memory.naive_exceeds.logprobs", f"{model}/full_vocab_fp32",
                     f"T={LONG_CONTEXT}", report, fixed)


def test_meta_naive_experts_exceed_ceiling(recorder):
    model = "gpt-oss-20b"
    report = _meta_layer(model, "triton", "batched_mm")
    fixed = analytic.layer_step_estimate(model_config(model), LONG_CONTEXT, BF16, "triton")
    _exceeds_ceiling(recorder, "memory.naive_exceeds.experts", f"{model}/transformers_batched_mm",
                     f"T={LONG_CONTEXT}", report, fixed)


def test_meta_dense_eval_experts_exceed_ceiling(recorder):
    model = "gpt-oss-20b"
    config = model_config(model)
    hf_config = gpt_oss_config(config, attention="triton", experts=DENSE_EXPERTS_IMPLEMENTATION)
    layer = decoder_layer(hf_config, layer_index=1, dtype=BF16)
    report = layer_eval_forward(TrackedMeter(META), layer, position_embeddings(hf_config, LONG_CONTEXT, BF16),
                                LONG_CONTEXT)
    fixed = analytic.layer_step_estimate(config, LONG_CONTEXT, BF16, "triton")  # forward and backward
    _exceeds_ceiling(recorder, "memory.naive_exceeds.experts", f"{model}/dense_eval_experts",
                     f"T={LONG_CONTEXT},no_grad", report, fixed)


def test_meta_eager_attention_exceeds_ceiling(recorder):
    model = "gpt-oss-20b"
    report = _meta_layer(model, "eager", EXPERTS_IMPLEMENTATION)
    fixed = analytic.layer_step_estimate(model_config(model), LONG_CONTEXT, BF16, "triton")
    _exceeds_ceiling(recorder, "memory.naive_exceeds.attention", f"{model}/eager_attention",
                     f"T={LONG_CONTEXT}", report, fixed)


# ------------------------------------------------------------------------------------------------ CUDA


def _cuda_baseline() -> int:
    """Bytes allocated before a CUDA check builds anything: its weights and inputs count, as in the estimate."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _cuda_measure(run, baseline, estimate, snapshot):
    """(peak above `baseline`, report), with the allocator's history written to `snapshot` when over the ceiling."""
    from rlparity.memory.cuda import CudaMeter

    meter = CudaMeter(snapshot_path=snapshot)
    report = run(meter)
    measured = report.peak - baseline
    if measured > ceiling(estimate.peak):
        meter.dump_snapshot(snapshot)
    return measured, report


def _judge_cuda(recorder, prop, subject, case, measured, report, estimate, snapshot, exceed=False):
    limit = ceiling(estimate.peak)
    passed = measured > limit if exceed else measured <= limit
    reason = (f"peak {format_bytes(measured)} above the baseline vs ceiling {format_bytes(limit)} "
              f"(reserved {format_bytes(report.reserved_peak or 0)})")
    if measured > limit:
        reason += f"; allocator snapshot: {snapshot}"
    _record(recorder, prop, subject, case, passed, measured, limit, reason, {"report": report.as_dict()})


CUDA_ATTENTION = {"chunked": "chunked", "triton": "rlparity.attention.triton_sink:attend"}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", list(CUDA_ATTENTION))
def test_cuda_real_size_layer_within_ceiling(attention, tmp_path, recorder):
    from rlparity.attention import triton_sink
    from rlparity.attention.registry import AVAILABLE

    model = "gpt-oss-20b"
    device = torch.device("cuda")
    if attention == "triton" and (availability := triton_sink.probe(device)) != AVAILABLE:
        pytest.skip(f"triton: {availability}")
    config = model_config(model)
    hf_config = gpt_oss_config(config, attention=CUDA_ATTENTION[attention], experts=EXPERTS_IMPLEMENTATION)
    baseline = _cuda_baseline()
    layer = decoder_layer(hf_config, layer_index=1, dtype=BF16, device=device)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(std=hf_config.initializer_range)
        layer.mlp.router.weight.normal_()  # distinct top-k choices
    cos_sin = position_embeddings(hf_config, LONG_CONTEXT, BF16, device)
    estimate = analytic.layer_step_estimate(config, LONG_CONTEXT, BF16, attention)
    snapshot = tmp_path / f"layer-{attention}.pickle"
    measured, report = _cuda_measure(lambda meter: layer_step(meter, layer, cos_sin, LONG_CONTEXT), baseline, estimate,
                                     snapshot)
    _judge_cuda(recorder, "memory.layer.cuda", f"{model}/{attention}/{EXPERTS_IMPLEMENTATION}",
                f"T={LONG_CONTEXT}", measured, report, estimate, snapshot)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("chunk,tokens", [(LOGPROB_CHUNK, LONG_CONTEXT), (None, CUDA_NAIVE_TOKENS)],
                         ids=["chunked", "naive_exceeds"])
def test_cuda_logprob_pass(chunk, tokens, tmp_path, recorder):
    model = "gpt-oss-20b"
    d = Dims.of(model_config(model))
    device = torch.device("cuda")
    baseline = _cuda_baseline()
    hidden = torch.randn(tokens, d.hidden, dtype=BF16, device=device, requires_grad=True)
    weight = (torch.randn(d.vocab, d.hidden, dtype=BF16, device=device) / d.hidden**0.5).requires_grad_()
    targets = torch.randint(0, d.vocab, (tokens,), device=device)
    estimate = analytic.logprob_step_estimate(model_config(model), tokens, BF16, LOGPROB_CHUNK)
    snapshot = tmp_path / f"logprobs-{chunk}.pickle"
    measured, report = _cuda_measure(lambda meter: logprob_step(meter, hidden, weight, targets, chunk), baseline,
                                     estimate, snapshot)
    subject = f"{model}/{'chunked_logprobs' if chunk else 'full_vocab_fp32'}"
    _judge_cuda(recorder, "memory.logprob_pass.cuda", subject, f"T={tokens}", measured, report,
                estimate, snapshot, exceed=chunk is None)
