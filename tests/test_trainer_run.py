"""The trainer end to end on the micro model: metrics, on-policy ratio, refusals, sync, failures mid-run."""

import math

import pytest
import torch

from rlparity.errors import RlparityError
from rlparity.results import ResultStore, read_records
from rlparity.trainer.config import TrainConfig
from rlparity.trainer.hf_sampler import HFSampler
from rlparity.trainer.run import train_run
from rlparity.trainer.sft import SftRecipe, sft_checkpoint
from rlparity.trainer.sync import verify_weights
from rlparity.trainer.trainer import EVAL_PROPERTY, STEP_PROPERTY, Trainer

# A few SFT steps are enough for micro to emit the format now and then; these tests check mechanics, not learning.
MICRO_SFT = SftRecipe(steps=10, batch=8)
SMALL = dict(model="micro", prompts_per_step=2, group=2, eval_prompts=4, chunk_size=64)


@pytest.fixture(scope="module")
def micro_sft(tmp_path_factory):
    return sft_checkpoint("micro", MICRO_SFT, cache_dir=tmp_path_factory.mktemp("sft-cache"), log=lambda line: None)


def hf_factory(config, checkpoint):
    return HFSampler(checkpoint, temperature=config.temperature)


def test_sft_fixture_is_cached_and_reproducible(micro_sft, tmp_path):
    again = sft_checkpoint("micro", MICRO_SFT, cache_dir=micro_sft.parents[1], log=lambda line: None)
    assert again == micro_sft
    rebuilt = sft_checkpoint("micro", MICRO_SFT, cache_dir=tmp_path, log=lambda line: None)
    assert (rebuilt / "model.safetensors").read_bytes() == (micro_sft / "model.safetensors").read_bytes()
    weights = rebuilt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RlparityError, match="is corrupt: model.safetensors has sha256"):
        sft_checkpoint("micro", MICRO_SFT, cache_dir=tmp_path, log=lambda line: None)


def test_detach_run_records_every_metric_and_ratio_one(micro_sft, tmp_path):
    store = ResultStore(tmp_path / "run.jsonl")
    summary = train_run(TrainConfig(steps=2, old_logprob="detach", **SMALL), micro_sft, store,
                        sampler_factory=hf_factory, log=lambda line: None)
    records = read_records(store.path)
    steps = [r["extra"] for r in records if r["property"] == STEP_PROPERTY]
    assert [r["case"] for r in records if r["property"] == EVAL_PROPERTY] == ["before", "after"]
    assert len(steps) == 2 and len(summary["history"]) == 2
    for metrics in steps:
        for key in ("reward", "kl_k1", "kl_k3", "entropy", "ratio_mean", "ratio_max", "ratio_min", "clip_fraction",
                    "train_rollout_dlogp_mean", "train_rollout_dlogp_max", "routing_flip_rate", "step_s"):
            assert key in metrics, key
        assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["clip_fraction"] == 0.0
        # the users' own names for the training pass against the rollout (rlparity.mismatch_metrics)
        assert 0 < metrics["train/train_rollout_logprob_abs_diff"] <= metrics["train_rollout_dlogp_max"]
        assert 1 < metrics["train/token_mult_prob_error"] <= math.exp(metrics["train_rollout_dlogp_max"])
        assert metrics["sync_sinks"] > 0 and metrics["sync_routers"] > 0 and metrics["sync_dtypes"] == "float32"


def test_detach_is_refused_off_policy():
    with pytest.raises(RlparityError, match="strictly on-policy.*2 mini-batches x 2 epochs.*recompute"):
        TrainConfig(algo="ppo", old_logprob="detach").check()
    with pytest.raises(RlparityError, match="1 mini-batches x 2 epochs"):
        TrainConfig(algo="grpo", old_logprob="detach", epochs=2).check()


def test_ppo_recompute_with_tis_runs(micro_sft, tmp_path):
    store = ResultStore(tmp_path / "ppo.jsonl")
    config = TrainConfig(steps=1, algo="ppo", old_logprob="recompute", correction="tis", **SMALL)
    (metrics,) = train_run(config, micro_sft, store, evaluate=False, sampler_factory=hf_factory,
                           log=lambda line: None)["history"]
    assert metrics["correction_weight_mean"] > 0


def test_sync_verification_names_a_corrupted_tensor(micro_sft):
    sampler = HFSampler(micro_sft)
    weights = {name: tensor.clone() for name, tensor in sampler.state_dict().items()}
    engine = {name: tensor.clone() for name, tensor in weights.items()}
    sink = next(name for name in engine if name.endswith("sinks"))
    engine[sink][0] += 1e-3
    with pytest.raises(RlparityError, match=rf"{sink} differs from the trainer's by up to 0.001"):
        verify_weights(weights, engine, "test")
    engine[sink] = weights[sink].to(torch.bfloat16)
    with pytest.raises(RlparityError, match=rf"{sink} is torch.bfloat16 .* expected the trainer's torch.float32"):
        verify_weights(weights, engine, "test")
    router = next(name for name in engine if "router" in name)
    del engine[router]
    with pytest.raises(RlparityError, match="the engine lacks"):
        verify_weights(weights, engine, "test")


class DyingSampler(HFSampler):
    """Dies (as an engine process would) on its n-th turn request."""

    def __init__(self, checkpoint, dies_at):
        super().__init__(checkpoint)
        self.calls, self.dies_at = 0, dies_at

    def sample_turns(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.dies_at:
            raise RuntimeError("engine process exited with code -9 while sampling")
        return super().sample_turns(*args, **kwargs)


def test_engine_dying_mid_run_keeps_earlier_metrics(micro_sft, tmp_path):
    store = ResultStore(tmp_path / "dies.jsonl")
    sampler = DyingSampler(micro_sft, dies_at=5)  # turn requests: <= 3 per step, so it dies in step 1 or 2
    config = TrainConfig(steps=4, **SMALL)
    trainer = Trainer(config, micro_sft, sampler, store, log=lambda line: None)
    with pytest.raises(RlparityError,
                       match=r"step \d of 4 failed \(RuntimeError: engine process exited.*completed steps"):
        trainer.train()
    records = read_records(store.path)
    assert records[-1]["verdict"] == "error" and "exited with code -9" in records[-1]["reason"]
    passed = [r for r in records if r["verdict"] == "pass"]
    assert len(passed) == len(trainer.history) >= 1


def test_unloadable_checkpoint_is_a_clear_error(micro_sft, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in micro_sft.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    with pytest.raises(RlparityError, match="safetensors"):
        train_run(TrainConfig(steps=1, **SMALL), broken, ResultStore(tmp_path / "r.jsonl"), sampler_factory=hf_factory)
    with pytest.raises(RlparityError):
        train_run(TrainConfig(steps=1, **SMALL), tmp_path / "missing", ResultStore(tmp_path / "r.jsonl"),
                  sampler_factory=hf_factory)
