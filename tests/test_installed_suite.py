"""The conformance suite from a built wheel, run outside the repository against a user's kernel.

The wheel is built from this checkout and installed, without dependencies, into a fresh virtual environment;
torch, transformers and pytest come from this environment's site-packages through a .pth line (which does not
run this environment's editable-install hook, so the only rlparity the new environment sees is the wheel's).
The user's kernel is a file in a temporary folder, and the suite runs from there.
"""

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SUITE_TIMEOUT_S = 600
# The first test's setup builds the wheel and installs it, then the test runs the suite: three commands of
# SUITE_TIMEOUT_S each, which report first (measured: the slowest test took 45 s, setup included 7 s).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * SUITE_TIMEOUT_S + 60)]

USER_KERNEL = textwrap.dedent('''
    """A user's sink attention in plain torch: scores, sink column, softmax, drop the sink column."""
    import torch


    def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
        if cu_seqlens is not None or window is not None or q.shape[2] != k.shape[2]:
            raise NotImplementedError("only full-length causal or bidirectional attention without packing")
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            n = q.shape[2]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        logits = torch.cat([scores, sink], dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        return (probs @ v.float()).to(q.dtype), lse


    def unsupported(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
        raise NotImplementedError("this kernel supports nothing")
''')


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh environment holding the rlparity wheel, a folder outside the repository)."""
    root = tmp_path_factory.mktemp("installed")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPOSITORY)], check=True, timeout=SUITE_TIMEOUT_S)
    (wheel,) = wheels.glob("rlparity-*.whl")
    environment = root / "env"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=SUITE_TIMEOUT_S)
    work = root / "user"
    work.mkdir()
    (work / "my_kernel.py").write_text(USER_KERNEL)
    return python, work


def run_suite(installed, *args):
    python, work = installed
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RLPARITY_FIXTURES")}
    return subprocess.run([python.parent / "rlparity", "conformance", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)


def test_the_wheel_is_what_runs(installed):
    python, work = installed
    where = subprocess.check_output([python, "-c", "import rlparity.conformance, rlparity.models.specs as s, "
                                     "rlparity.parity.batch as b; print(rlparity.conformance.__file__); "
                                     "print(s.models_dir()); print(b.prompts_path())"],
                                    cwd=work, text=True).split()
    assert all(str(REPOSITORY) not in path for path in where), where
    assert all(str(python.parents[1]) in path for path in where), where
    assert all(Path(path).exists() for path in where), where  # the suite, the model configs, the prompt set


def test_user_kernel_passes_from_outside_the_repository(installed):
    run = run_suite(installed, "--only", "attention", "--attention-backend", "my_kernel:attend", "-q",
                    "-k", "fp32 and (tiny or gqa8 or bidirectional)")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "my_kernel:attend" in run.stdout and "nothing was checked" not in run.stdout
    assert list((installed[1] / "results").glob("conformance-*.jsonl")), "no results file in the user's folder"


def test_kernel_that_supports_nothing_exits_3(installed):
    run = run_suite(installed, "--only", "attention", "--attention-backend", "my_kernel:unsupported", "-q",
                    "-k", "fp32 and tiny")
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "nothing was checked for my_kernel:unsupported" in run.stdout


def test_bad_kernel_path_exits_2(installed):
    run = run_suite(installed, "--only", "attention", "--attention-backend", "my_kernel:missing", "-q")
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert "has no attribute 'missing'" in run.stdout + run.stderr
