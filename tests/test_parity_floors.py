"""Noise floors (measure, store with their command, refuse stale ones) and parity cells (pass, skip with the
reason, an engine's death reported while the other pairs still run), on `micro`."""

import json

import pytest

from rlparity.engines.process import EngineProcessError
from rlparity.errors import RlparityError
from rlparity.metrics import AGREEMENT_METRICS, cannot_fail
from rlparity.parity import EngineFailed, EnginePool, Pair, Side, calibrate, load_floors, parity_batch
from rlparity.parity.check import check_pair
from rlparity.parity.floors import save_floors
from rlparity.parity.pairs import HF_FP32, REF_FP64, VLLM_FP32
from rlparity.results import ERROR, PASS, SKIP

LENGTHS = (12, 20, 33)


@pytest.fixture(scope="module")
def batch():
    return parity_batch("micro", lengths=LENGTHS)


@pytest.fixture(scope="module")
def floors_file(micro_checkpoint, batch, tmp_path_factory):
    entry = calibrate("micro", micro_checkpoint, batch, log=lambda message: None)
    return save_floors(entry, tmp_path_factory.mktemp("floors") / "noise_floors.json")


@pytest.fixture(scope="module")
def pool(micro_checkpoint):
    with EnginePool(micro_checkpoint) as engines:
        yield engines


def test_calibration_stores_every_floor_with_its_command(floors_file, batch):
    entry = json.loads(floors_file.read_text())["micro"]
    assert entry["command"] == "python -m rlparity.parity calibrate --model micro"
    assert entry["batch"]["token_ids_sha256"] == batch.sha256 and entry["model"]["weights_sha256"]
    for dtype in ("float32", "bfloat16"):
        for kind in ("naive", "cross", "self"):
            assert set(entry["floors"][dtype][kind]["deviations"]) == set(AGREEMENT_METRICS)
    # float32 implementations differ by rounding only; bf16 by far more
    fp32, bf16 = entry["floors"]["float32"], entry["floors"]["bfloat16"]
    assert 0 < fp32["cross"]["deviations"]["dlogp_max"] < 1e-4 < bf16["cross"]["deviations"]["dlogp_max"]
    assert load_floors("micro", batch, floors_file).command == entry["command"]


def test_floors_of_another_batch_are_refused_with_the_command(floors_file):
    other = parity_batch("micro", lengths=(12, 20))
    with pytest.raises(RlparityError, match=r"measured on batch \[12, 20, 33\].*re-measure with `python -m "
                                            r"rlparity.parity calibrate --model micro`"):
        load_floors("micro", other, floors_file)


def test_missing_or_stale_floors_are_named(floors_file, batch, tmp_path):
    with pytest.raises(RlparityError, match="no noise floors at .*: measure them with `python -m rlparity.parity "
                                            "calibrate --model micro`"):
        load_floors("micro", batch, tmp_path / "absent.json")
    with pytest.raises(RlparityError, match="has no noise floors for model 'tiny'"):
        load_floors("tiny", parity_batch("tiny"), floors_file)
    stale = json.loads(floors_file.read_text())
    stale["micro"]["model"]["recipe_sha256"] = "0" * 64
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(RlparityError, match="measured on recipe 0000"):
        load_floors("micro", batch, tmp_path / "stale.json")


def test_agreeing_pairs_pass_and_write_records(pool, batch, floors_file):
    floors = load_floors("micro", batch, floors_file)
    for pair in (Pair(HF_FP32, REF_FP64, "naive"), Pair(HF_FP32, HF_FP32, "self")):
        result = check_pair(pool, pair, batch, floors)
        assert result.verdict == PASS, result.reason
        records = result.records(batch)
        assert records[-1].property == "logprob_parity" and records[-1].error == result.measurement.stats["dlogp_max"]
        assert records[-1].tolerance == result.tolerances["dlogp_max"]
        frameworks = records[-1].extra["frameworks"]  # the users' own metric names, of the same log-probs
        assert frameworks["rollout_corr/kl"] == pytest.approx(result.measurement.stats["kl_k1"], rel=1e-9, abs=1e-15)
        assert frameworks["training/rollout_probs_diff_max"] > 0 and frameworks["train/token_mult_prob_error"] > 1
    assert [r.property for r in check_pair(pool, Pair(HF_FP32, REF_FP64, "naive"), batch, floors).records(batch)] == [
        "logprob_parity.semantics", "logprob_parity"]


def test_an_unavailable_engine_skips_with_what_to_install(pool, batch, floors_file, monkeypatch, tmp_path):
    monkeypatch.setenv("RLPARITY_VLLM_PYTHON", str(tmp_path / "no-python"))
    result = check_pair(pool, Pair(HF_FP32, VLLM_FP32, "cross"), batch, load_floors("micro", batch, floors_file))
    assert result.verdict == SKIP and "RLPARITY_VLLM_PYTHON" in result.reason and "vllm[float32]" in result.reason


class Dying:
    """An engine whose process dies at its first request."""

    def __init__(self, inner):
        self.inner, self.name = inner, "dying"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logprobs(self, *args, **kwargs):
        raise EngineProcessError("dying engine (pid 1): died while serving 'prompt_logprobs'\n--- last 40 lines of "
                                 "engine.log ---\nSegmentation fault")

    def close(self):
        pass


def test_an_engine_that_dies_is_reported_and_the_others_still_run(micro_checkpoint, batch, floors_file, monkeypatch):
    from rlparity.parity import sides

    dying_side = Side("reference", "float32")
    opened = sides.open_side
    monkeypatch.setattr(sides, "open_side", lambda side, checkpoint, max_len=None: (
        Dying(opened(side, checkpoint, max_len)) if side == dying_side else opened(side, checkpoint, max_len)))
    floors = load_floors("micro", batch, floors_file)
    with EnginePool(micro_checkpoint) as engines:
        died = check_pair(engines, Pair(HF_FP32, dying_side, "cross"), batch, floors)
        assert died.verdict == ERROR and "reference[float32] died" in died.reason
        assert "Segmentation fault" in died.reason  # the engine's log tail
        with pytest.raises(EngineFailed, match="Segmentation fault"):  # remembered: no second start
            engines.get(dying_side)
        assert check_pair(engines, Pair(dying_side, dying_side, "self"), batch, floors).verdict == ERROR
        assert check_pair(engines, Pair(HF_FP32, REF_FP64, "naive"), batch, floors).verdict == PASS


def test_an_engine_that_fails_to_start_is_an_error(micro_checkpoint, batch, floors_file, monkeypatch):
    from rlparity.parity import sides

    def refuse(side, checkpoint, max_len=None):
        raise EngineProcessError("vllm engine (pid 7): failed to start: RuntimeError: no attention backend")

    monkeypatch.setattr(sides, "open_side", refuse)
    with EnginePool(micro_checkpoint) as engines:
        result = check_pair(engines, Pair(HF_FP32, REF_FP64, "naive"), batch, load_floors("micro", batch, floors_file))
    assert result.verdict == ERROR and "hf[float32] failed to start" in result.reason
    assert "no attention backend" in result.reason


def test_sides_parse_and_label():
    side = Side.parse("vllm:bf16", options={"hf_overrides": {"sliding_window": None}})
    assert (side.engine, side.dtype) == ("vllm", "bfloat16") and side.short == "vllm-bf16"
    assert side.constructor_options == {"hf_overrides": {"sliding_window": None}}
    assert side.label == 'vllm[bfloat16,hf_overrides={"sliding_window": null}]'
    with pytest.raises(RlparityError, match="the 'self' floor is for one side against itself"):
        Pair(HF_FP32, REF_FP64, "self")


def test_bands_the_noise_fills_are_reported_as_unable_to_fail(floors_file, batch):
    floors = load_floors("micro", batch, floors_file)
    bf16 = floors.tolerances(Pair(Side("hf", "bfloat16"), REF_FP64, "naive"), rounding=0.0)
    fp32 = floors.tolerances(Pair(HF_FP32, REF_FP64, "naive"), rounding=0.0)
    # bfloat16 rounding alone moves most ratios outside 1 +- 0.001: that band cannot catch anything in bf16
    assert cannot_fail(bf16) == ["ratio_outside_0.001"] and bf16["ratio_outside_0.001"] >= 1.0
    assert cannot_fail(fp32) == []
