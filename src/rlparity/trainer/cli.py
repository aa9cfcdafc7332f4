"""`rlparity train`: the reference RL trainer from the command line, with defaults that run on a 2-core CPU.

    rlparity train                                   # GRPO, detach, hf engine, 60 steps on the SFT'd tiny model
    rlparity train --old-logprob recompute --correction tis --engine vllm
    python -m rlparity.trainer.cli train --steps 5   # the same without the top-level command
    torchrun --nproc-per-node 2 -m rlparity.trainer.cli train --prompts 16   # FSDP2 over 2 gloo ranks
    rlparity train --fsdp 2                          # the same: re-launches itself under torchrun
    rlparity train --model tiny --checkpoint DIR     # start from your checkpoint (a fine-tune of tiny: same tokenizer)

Prints a progress line per step, writes every step's metrics (and the reward on held-out tasks before and
after) to a JSON-lines results file, and plots them (PNG with matplotlib, else the HTML dashboard).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.model_option import add_checkpoint_argument
from rlparity.results import ResultStore, default_results_path
from rlparity.trainer.config import ALGOS, ENGINES, OLD_LOGPROB, VLLM_SYNCS, TrainConfig
from rlparity.trainer.losses import CORRECTIONS


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = subparsers.add_parser("train", help="run the reference RL trainer on the tool task",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--algo", choices=ALGOS, default=defaults.algo)
    parser.add_argument("--old-logprob", choices=OLD_LOGPROB, default=defaults.old_logprob,
                        help="detach: reuse the training forward (strictly on-policy only); recompute: a second pass")
    parser.add_argument("--correction", choices=CORRECTIONS, default=defaults.correction,
                        help="rollout-vs-trainer importance correction: truncated (tis) or masked (mis)")
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine)
    parser.add_argument("--vllm-sync", choices=VLLM_SYNCS, default=defaults.vllm_sync,
                        help="weights into the vllm engine after each step: in place (0.5 s on tiny) or by a restart "
                             "on a checkpoint (11 s)")
    parser.add_argument("--model", default=defaults.model, help="bundled model the SFT warm start is built from; its "
                        "synthetic language is the tool task's")
    add_checkpoint_argument(parser, help="start from this GPT-OSS checkpoint folder instead (config.json, "
                            "safetensors, tokenizer.json); its tokenizer must be --model's, the task's language")
    parser.add_argument("--prompts", type=int, default=defaults.prompts_per_step, help="prompts per step")
    parser.add_argument("--group", type=int, default=defaults.group, help="samples per prompt")
    parser.add_argument("--mini-batches", type=int, default=None, help="default: 1 for grpo, 2 for ppo")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 for grpo, 2 for ppo")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--kl-coef", type=float, default=defaults.kl_coef)
    parser.add_argument("--kl-estimator", choices=("k1", "k3"), default=defaults.kl_estimator)
    parser.add_argument("--entropy-coef", type=float, default=defaults.entropy_coef)
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts,
                        help="held-out tasks for the before/after reward (0 skips it)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file (default results/train-*.jsonl)")
    parser.add_argument("--report", type=Path, default=None, help="plot path without suffix (default: beside results)")
    parser.add_argument("--fsdp", type=int, default=None, metavar="N",
                        help="train data-parallel with FSDP2 on N local processes (re-launches under torchrun); "
                             "under torchrun itself FSDP2 is on whenever WORLD_SIZE > 1")
    parser.set_defaults(run=run_train)  # the top-level `rlparity` command calls args.run(args)
    return parser


def config_from_args(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, algo=args.algo, old_logprob=args.old_logprob, correction=args.correction,
                       engine=args.engine, vllm_sync=args.vllm_sync, model=args.model,
                       prompts_per_step=args.prompts, group=args.group,
                       mini_batches=args.mini_batches, epochs=args.epochs, lr=args.lr, kl_coef=args.kl_coef,
                       kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef,
                       eval_prompts=max(args.eval_prompts, 1), seed=args.seed)


def _without_fsdp(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--fsdp":
            skip = True
        elif not arg.startswith("--fsdp="):
            out.append(arg)
    return out


def relaunch_under_torchrun(ranks: int, argv: list[str]) -> int:
    """This same command on `ranks` local processes under torchrun (standalone rendezvous); its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "rlparity.trainer.cli", *_without_fsdp(argv)]
    return subprocess.call(command, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def run_train(args) -> int:
    from rlparity.trainer import distributed

    if args.fsdp is not None:
        if args.fsdp < 1:
            raise RlparityError(f"train: --fsdp needs a number of processes >= 1, got {args.fsdp}")
        if not distributed.launched_distributed():
            config = config_from_args(args)
            config.check()
            distributed.check_split(config.prompts_per_step, config.group, config.resolved_mini_batches, args.fsdp)
            argv = sys.argv[1:]
            return relaunch_under_torchrun(args.fsdp, argv[argv.index("train"):] if "train" in argv else argv)
    if not distributed.launched_distributed():
        return _train(args)
    import torch.distributed as dist

    from rlparity.parallel.launch import init_from_env

    # The trainer runs on the CPU whatever the machine has, so the process group is gloo.
    init_from_env(timeout_s=distributed.TRAIN_COLLECTIVE_TIMEOUT_S, backend="gloo")
    try:
        code = _train(args)
        # Ranks leave together: a rank that tears its gloo connections down while rank 0 still writes the report
        # can make rank 0's gloo abort the process on the closed connection.
        dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


def _train(args) -> int:
    from rlparity.trainer import distributed
    from rlparity.trainer.run import open_sampler, train_run
    from rlparity.trainer.sft import sft_checkpoint

    config = config_from_args(args)
    config.check()  # refuse bad combinations before building or starting anything
    if distributed.active():
        distributed.check_split(config.prompts_per_step, config.group, config.resolved_mini_batches,
                                distributed.world_size())
    if args.checkpoint is not None:
        from rlparity.models import validate_checkpoint
        from rlparity.models.user import require_language_tokenizer

        checkpoint = validate_checkpoint(args.checkpoint)
        require_language_tokenizer(checkpoint, config.model)
    else:
        # Every rank takes the same SFT checkpoint: the first builds it under a file lock, the others wait for it.
        checkpoint = sft_checkpoint(config.model, log=lambda line: print(line, file=sys.stderr))
    store = ResultStore(args.results or default_results_path("train"))  # written by rank 0 alone
    summary = train_run(config, checkpoint, store, evaluate=args.eval_prompts > 0, sampler_factory=open_sampler)
    if distributed.rank() != 0:
        return 0
    from rlparity.trainer.report import write_report

    plot = write_report([store.path], args.report or store.path.with_suffix(""))
    if "reward_before" in summary:
        print(f"held-out reward: before {summary['reward_before']:.3f}, after {summary['reward_after']:.3f} "
              f"({config.eval_prompts} tasks)")
    print(f"{len(summary['history'])} steps in {summary['seconds']:.0f}s; metrics: {store.path}; plots: {plot}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlparity")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RlparityError as exc:
        print(f"rlparity train: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)


if __name__ == "__main__":
    sys.exit(main())
