"""Sessions: tests, conformance (the main job), gpu_conformance, benchmarks, dashboard, lint.

Each installs what it needs, then runs one command; arguments after `--` go to that command:
    nox -s conformance -- -k window
"""

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "conformance"]

# On the development and CI machines `pip install torch==2.13.0` takes a local CPU wheel. Elsewhere,
# point this at the build you want (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
TORCH = os.environ.get("RLPARITY_TORCH", "torch==2.13.0")
PYTEST = ["pytest", "-p", "no:cacheprovider"]


def install(session, extras="dev,triton"):
    session.install(*TORCH.split())
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session):
    """rlparity's own tests, CPU only."""
    install(session)
    session.run(*PYTEST, "tests", *session.posargs)


@nox.session
def conformance(session):
    """The conformance suite on whatever this machine has (CPU: Triton through its interpreter)."""
    install(session)
    session.run(*PYTEST, "conformance", *session.posargs)


@nox.session(venv_params=["--system-site-packages"])
def gpu_conformance(session):
    """The conformance suite on CUDA; uses the machine's CUDA torch and fails at once without a GPU."""
    session.install("--no-deps", "-e", ".")
    session.install("pytest", "pytest-benchmark", "pytest-timeout")
    session.run(*PYTEST, "conformance", "--require-cuda", *session.posargs)


@nox.session
def benchmarks(session):
    """pytest-benchmark suites; the JSON lands in benchmarks/results/."""
    install(session)
    os.makedirs("benchmarks/results", exist_ok=True)
    session.run(*PYTEST, "benchmarks", "--benchmark-only",
                "--benchmark-json=benchmarks/results/latest.json", *session.posargs)


@nox.session
def dashboard(session):
    """Conformance results and benchmark JSON -> dashboard/index.html."""
    session.install("--no-deps", "-e", ".")  # the page needs nothing but the standard library
    session.run("rlparity", "dashboard", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "conformance", "benchmarks", "noxfile.py", *session.posargs)
