"""Every test has a time limit (rlparity.pytest_plugin sets pytest-timeout's default), also outside the repository.

A hanging test in a pytest run of its own, from a folder with no pytest configuration (as the installed suite runs
from a user's folder): it is stopped by the plugin's default timeout (made short through the plugin's constant by
the folder's conftest.py), reported as a failure with exit status 1, and its fixture's child process is stopped.
"""

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from rlparity.pytest_plugin import DEFAULT_TEST_TIMEOUT_S, TIMEOUT_METHOD

pytest.importorskip("pytest_timeout")

HANG_TIMEOUT_S = 3.0  # the default timeout the hanging run is given, through DEFAULT_TEST_TIMEOUT_S
# A pytest run here starts in about 5 s (imports: torch, through rlparity's plugin) and more when the 2 cores are
# shared; with the 3 s timeout the hanging run took 11 s end to end (load 4). 60 s is over 5 times that, and a hang
# (the test sleeps 10 minutes) cannot pass it.
HANG_REPORTED_WITHIN_S = 60.0

CONFTEST = textwrap.dedent(f"""
    import rlparity.pytest_plugin

    rlparity.pytest_plugin.DEFAULT_TEST_TIMEOUT_S = {HANG_TIMEOUT_S}
""")
HANGING_TEST = textwrap.dedent("""
    import subprocess
    import sys
    import time

    import pytest


    @pytest.fixture
    def child(tmp_path_factory):
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        yield process
        process.kill()
        process.wait()


    def test_hangs(child):
        with open("child.pid", "w") as handle:
            handle.write(str(child.pid))
        time.sleep(600)


    def test_after_the_hang():
        pass
""")


def pytest_run(folder, *args, timeout):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=folder,
                          capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "PYTEST_TIMEOUT"})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie has exited; its parent (pytest) is gone too
        return handle.read().split()[2] != "Z"


def test_a_hanging_test_fails_within_the_default_timeout_and_its_fixture_cleans_up(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_hang.py").write_text(HANGING_TEST)
    start = time.monotonic()
    run = pytest_run(tmp_path, "-q", "test_hang.py", timeout=HANG_REPORTED_WITHIN_S * 2)
    elapsed = time.monotonic() - start
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-3000:]
    assert "1 failed, 1 passed" in output and "Timeout" in output, output[-3000:]
    assert elapsed < HANG_REPORTED_WITHIN_S, f"the hang was reported after {elapsed:.0f}s"
    assert not alive(int((tmp_path / "child.pid").read_text())), "the fixture's child outlived the timeout"


def resolved_timeout(folder, *args) -> tuple[float, str]:
    """(timeout, method) as pytest-timeout reports them in the header of a collection in `folder`."""
    run = pytest_run(folder, "--collect-only", *args, timeout=HANG_REPORTED_WITHIN_S * 2)
    timeout = re.search(r"^timeout: ([\d.]+)s$", run.stdout, re.M)
    method = re.search(r"^timeout method: (\w+)$", run.stdout, re.M)
    assert timeout and method, run.stdout[-2000:] + run.stderr[-2000:]
    return float(timeout.group(1)), method.group(1)


def test_the_default_applies_outside_the_repository_and_yields_to_an_explicit_one(tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    assert resolved_timeout(tmp_path) == (DEFAULT_TEST_TIMEOUT_S, TIMEOUT_METHOD)
    assert resolved_timeout(tmp_path, "--timeout", "7") == (7.0, TIMEOUT_METHOD)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 9\ntimeout_method = thread\n")
    assert resolved_timeout(tmp_path) == (9.0, "thread")


def test_the_installed_suite_run_from_a_folder_of_its_own_has_the_default(tmp_path):
    run = subprocess.run([sys.executable, "-m", "rlparity.cli", "conformance", "--only", "drift", "--collect-only"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=HANG_REPORTED_WITHIN_S * 2,
                         env={k: v for k, v in os.environ.items() if k != "PYTEST_TIMEOUT"})
    assert f"timeout: {DEFAULT_TEST_TIMEOUT_S}s\ntimeout method: {TIMEOUT_METHOD}\n" in run.stdout, run.stdout[-2000:]
    assert "rootdir: " + str(tmp_path) in run.stdout  # no configuration file of the repository was read
