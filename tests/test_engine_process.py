"""rlparity.engines.process against a tiny planted engine (tests/echo_engine.py): exact arrays over the
wire, and the errors for an engine that fails to start, hangs, dies mid-request, or answers out of turn."""

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from rlparity.engines.process import EngineProcess, EngineProcessError, inductor_cache_dir

pytestmark = pytest.mark.multi_process

ECHO = str(Path(__file__).with_name("echo_engine.py"))
SRC = str(Path(__file__).resolve().parents[1] / "src")
QUICK_S = 2.0  # the echo engine answers in milliseconds; this only bounds a test that goes wrong


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def echo_engine(*extra: str, log_path) -> EngineProcess:
    """Logs to the test's tmp_path, so that the logs errors keep do not pile up in the system's temp folder."""
    return EngineProcess("echo", [sys.executable, ECHO, *extra], env=ENV, log_path=log_path)


def test_arrays_and_floats_cross_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    payload = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "i64": np.arange(6).reshape(2, 3),
               "floats": [0.1, -1e-300, 1 / 3], "nested": {"bf": np.float32(2.5)}}
    with echo_engine(log_path=tmp_path / "echo.log") as engine:
        engine.start(timeout=30)
        back = engine.request("echo", QUICK_S, **payload)
    np.testing.assert_array_equal(back["f32"], payload["f32"])
    assert back["f32"].dtype == np.float32 and back["i64"].dtype == payload["i64"].dtype
    assert back["floats"] == payload["floats"] and back["nested"] == {"bf": 2.5}


def test_a_failed_start_names_the_error_and_shows_the_log(tmp_path):
    engine = echo_engine("--start", "fail", log_path=tmp_path / "echo.log")
    with pytest.raises(EngineProcessError, match="failed to start: ValueError: planted start failure") as info:
        engine.start(timeout=30)
    assert "echo engine: cannot load the model" in str(info.value)
    assert not engine.running
    engine.close()


def test_a_hung_start_times_out_and_is_stopped(tmp_path):
    engine = echo_engine("--start", "hang", log_path=tmp_path / "echo.log")
    with pytest.raises(EngineProcessError, match="no answer to 'start' within 5 s; the process was stopped") as info:
        engine.start(timeout=5.0)
    assert "echo engine: starting" in str(info.value)
    assert not engine.running
    engine.close()


def test_a_hung_request_times_out_and_is_stopped(tmp_path):
    with echo_engine(log_path=tmp_path / "echo.log") as engine:
        engine.start(timeout=30)
        with pytest.raises(EngineProcessError, match="no answer to 'sleep' within 1 s") as info:
            engine.request("sleep", 1.0, seconds=60)
        assert "echo engine: request sleep" in str(info.value)
        assert not engine.running
        with pytest.raises(EngineProcessError, match="cannot serve 'echo'"):
            engine.request("echo", QUICK_S)


def test_death_mid_request_reports_exit_code_and_log_tail(tmp_path):
    with echo_engine(log_path=tmp_path / "echo.log") as engine:
        engine.start(timeout=30)
        died = "died while serving 'exit': the process exited with code 3"
        with pytest.raises(EngineProcessError, match=died) as info:
            engine.request("exit", QUICK_S, code=3)
        assert f"(pid {engine.pid})" in str(info.value) and "echo engine: request exit" in str(info.value)


def test_death_by_signal_is_named(tmp_path):
    with echo_engine(log_path=tmp_path / "echo.log") as engine:
        engine.start(timeout=30)
        threading.Timer(0.3, os.kill, (engine.pid, 9)).start()
        with pytest.raises(EngineProcessError, match="killed by signal SIGKILL"):
            engine.request("sleep", 30, seconds=20)


def test_a_failed_request_keeps_the_engine(tmp_path):
    with echo_engine(log_path=tmp_path / "echo.log") as engine:
        engine.start(timeout=30)
        with pytest.raises(EngineProcessError, match="request 'fail' failed in the engine: RuntimeError: planted"):
            engine.request("fail", QUICK_S)
        assert engine.request("echo", QUICK_S, x=1)["x"] == 1


def test_an_answer_out_of_turn_stops_the_engine(tmp_path):
    with echo_engine(log_path=tmp_path / "echo.log") as engine:
        engine.start(timeout=30)
        with pytest.raises(EngineProcessError, match="answered request 101 while 1 .'wrong_id'. was expected"):
            engine.request("wrong_id", QUICK_S)
        assert not engine.running


def test_close_shuts_down_and_removes_the_log():
    engine = EngineProcess("echo", [sys.executable, ECHO], env=ENV)
    engine.start(timeout=30)
    engine.close()
    assert not engine.running and not engine.log_path.exists() and not engine.workdir.exists()
    engine.close()  # idempotent


def test_the_engines_temporary_files_go_with_its_folder(tmp_path):
    engine = echo_engine(log_path=tmp_path / "echo.log")
    engine.start(timeout=30)
    answer = engine.request("temp_file", QUICK_S)
    temp_file = Path(answer["path"])
    assert temp_file.parent == engine.workdir and temp_file.is_file()
    # torch's compile cache, named from the temp folder, leads to the shared one: compiled once, not at every start
    assert answer["inductor_cache"] == os.path.realpath(inductor_cache_dir())
    engine.close()
    assert not temp_file.exists() and not engine.workdir.exists()


def test_a_log_that_was_asked_for_stays(tmp_path):
    engine = echo_engine(log_path=tmp_path / "echo.log")
    engine.start(timeout=30)
    engine.close()
    assert "echo engine: starting" in (tmp_path / "echo.log").read_text() and not engine.workdir.exists()
