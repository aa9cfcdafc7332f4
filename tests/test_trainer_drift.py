"""The drift check (rlparity.trainer.drift) on step histories: flat passes, a jump fails naming the step."""

import pytest

from rlparity.results import FAIL, PASS
from rlparity.trainer.drift import DRIFT_K, DRIFT_METRIC, check_drift


def history(values, first_max=1e-6):
    return [{"train_rollout_dlogp_max": first_max if step == 0 else 1.0, DRIFT_METRIC: value}
            for step, value in enumerate(values)]


def test_a_mismatch_at_the_first_steps_level_passes():
    record = check_drift(history([1e-7, 1.3e-7, 0.8e-7]), "run", "float32")
    assert record.verdict == PASS and record.tolerance == DRIFT_K * 1e-6
    assert record.extra[DRIFT_METRIC] == [1e-7, 1.3e-7, 0.8e-7]


def test_a_jump_after_the_first_step_fails_naming_it():
    record = check_drift(history([1e-7, 2e-2, 7e-3]), "run", "float32")
    assert record.verdict == FAIL and record.error == 2e-2
    assert "at step 1, expected <= 2e-06" in record.reason


def test_one_step_cannot_drift():
    with pytest.raises(ValueError, match="a run of 1 step"):
        check_drift(history([1e-7]), "run", "float32")
