"""The conformance suite's exit status and summary (rlparity.pytest_plugin), on small selections of the matrix.

0 every checked cell passed, 1 a cell failed, 2 a bad option, 3 nothing was checked: no cell at all, or none of
a component the user selected (the rest of the run passing does not make up for it).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
UNSUPPORTED = textwrap.dedent('''
    def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
        raise NotImplementedError("this kernel supports nothing")
''')


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "unsupported_kernel.py").write_text(UNSUPPORTED)
    return folder


def suite(*args, folder: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(REPOSITORY)]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           str(REPOSITORY / "conformance" / "test_sink_attention.py"),
                           "--results", str(folder / "results.jsonl"), *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_passing_cells_exit_0(user_folder):
    run = suite("--attention-backend", "chunked", "-k", "fp32 and tiny", folder=user_folder)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "chunked" in run.stdout and "nothing was checked" not in run.stdout


def test_failing_cell_exits_1(user_folder):
    run = suite("--attention-backend", "tests.planted_attention:ignores_sinks", "-k", "fp32 and tiny",
                folder=user_folder)
    assert run.returncode == 1, run.stdout[-2000:]


def test_only_skips_exit_3(user_folder):
    run = suite("-k", "fa3 and fp32 and tiny", folder=user_folder)  # GPU-only on a CPU machine: all skipped
    assert run.returncode == 3, run.stdout[-2000:]
    assert "nothing was checked: no cell passed or failed" in run.stdout


def test_empty_selection_exits_3(user_folder):
    run = suite("-k", "no_such_cell", folder=user_folder)
    assert run.returncode == 3, run.stdout[-2000:]


def test_selected_component_with_nothing_checked_exits_3(user_folder):
    run = suite("--attention-backend", "chunked", "--attention-backend", "unsupported_kernel:attend",
                "-k", "fp32 and tiny", folder=user_folder)
    assert run.returncode == 3, run.stdout[-2000:]
    assert "nothing was checked for unsupported_kernel:attend" in run.stdout
    # skips are summarised one line per reason, with the count
    summary = [line for line in run.stdout.splitlines() if "this kernel supports nothing" in line and " x " in line]
    assert len(summary) == 1 and summary[0].split()[:2] == ["7", "x"], run.stdout[-2000:]


def test_bad_option_exits_2(user_folder):
    run = suite("--attention-backend", "unsupported_kernel:missing", folder=user_folder)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "has no attribute 'missing'" in run.stdout + run.stderr
