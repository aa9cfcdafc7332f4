"""Parity tooling against real vLLM on `micro` (skipped with the reason without an interpreter that has vLLM,
see rlparity.engines.vllm): one engine process serves the preflight, a parity cell and the layer diff."""

import pytest

from rlparity.engines.vllm import unavailable_reason
from rlparity.parity import EnginePool, Pair, calibrate, diff_sides, parity_batch, preflight
from rlparity.parity.batch import PARITY_MAX_LEN, language_tokens
from rlparity.parity.check import check_pair
from rlparity.parity.floors import NoiseFloors
from rlparity.parity.pairs import FP32_ENGINE_BAR, HF_FP32, VLLM_FP32
from rlparity.parity.semantics import OK, SAMPLE_TOKENS, SKIPPED
from rlparity.results import PASS, ResultStore, read_records

REASON = unavailable_reason()
pytestmark = [pytest.mark.engine_vllm, pytest.mark.multi_process,
              pytest.mark.skipif(REASON is not None, reason=f"needs vLLM: {REASON}")]


@pytest.fixture(scope="module")
def batch():
    return parity_batch("micro", lengths=(12, 20, 33, 48))


@pytest.fixture(scope="module")
def pool(micro_checkpoint):
    with EnginePool(micro_checkpoint, max_len=PARITY_MAX_LEN) as engines:
        yield engines


def test_preflight_finds_vllm_means_raw_logprobs(pool, batch):
    report = preflight(pool.get(HF_FP32), pool.get(VLLM_FP32), batch, tolerance=FP32_ENGINE_BAR)
    statuses = {finding.check: finding.status for finding in report.findings}
    assert report.ok and statuses["log-probs [raw]"] == OK, "\n".join(report.lines())
    # vLLM's teacher-forced log-probs are raw only: the processed probe is skipped with vLLM's reason
    assert statuses["log-probs [processed T=0.7]"] == SKIPPED
    sampled = next(finding for finding in report.findings if finding.check.startswith("sampled"))
    assert sampled.status == OK and len(sampled.sampled_tokens) == SAMPLE_TOKENS  # kept to compare versions


def test_hf_fp32_and_vllm_fp32_agree_within_the_floor_and_the_bar(pool, batch, micro_checkpoint, tmp_path):
    entry = calibrate("micro", micro_checkpoint, batch, dtypes=("float32",), log=lambda message: None)
    result = check_pair(pool, Pair(HF_FP32, VLLM_FP32, "cross", bar=FP32_ENGINE_BAR), batch,
                        NoiseFloors(entry, micro_checkpoint))
    assert result.verdict == PASS, result.reason
    assert result.measurement.stats["dlogp_max"] <= FP32_ENGINE_BAR
    # The records name the vLLM that ran in the engine's own process, which this process's fingerprint cannot see.
    store = ResultStore(tmp_path / "parity.jsonl")
    for record in result.records(batch):
        store.append(record)
    vllm = pool.get(VLLM_FP32)
    assert vllm.info["versions"]["vllm"]
    assert all(row["environment"]["engines"] == {vllm.name: vllm.info["versions"]} for row in read_records(store.path))


def test_layer_diff_sees_vllm_activations_within_the_floor(pool):
    tokens = language_tokens("micro", seed=5, lengths=[48])[0]
    report = diff_sides(pool, HF_FP32, VLLM_FP32, tokens)
    assert report.first is None, "\n".join(report.table())
    assert report.points[-1].name == "logits" and report.points[-1].error > 0  # vLLM's own logits, not a copy
