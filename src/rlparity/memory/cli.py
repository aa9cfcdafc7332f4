"""`rlparity memory`: the per-rank phase table of one RL training step, and whether it fits a budget.

    rlparity memory --model gpt-oss-20b --tokens 24576 --world 16 --attention triton --budget 80GiB
    rlparity memory --checkpoint ./my-gpt-oss --tokens 8192 --budget 80GiB   # your model, from its config.json

The table is the closed-form estimate (rlparity.memory.analytic). --verify also runs one real-size
decoder layer and the log-prob pass on the meta device under the tracker and prints them against the
estimate. Exit status: 0 fits (or no budget given), 1 does not fit, 2 bad arguments.

This module imports no torch: the rlparity command builds every subcommand's parser, and torch loads
only when this one runs (rlparity.memory.table).
"""

import argparse

from rlparity.errors import RlparityError
from rlparity.memory.configs import REAL_SIZE, folder_config, model_config
from rlparity.memory.footprints import ATTENTION_PATHS
from rlparity.memory.report import format_bytes, parse_bytes
from rlparity.model_option import add_model_arguments

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # option -> torch attribute
DEFAULT_CHUNK = 1024  # tokens per log-prob chunk: 1024 x 201,088 float32 logits = 0.77 GiB per buffer


def _chunk(text: str) -> int | None:
    if text.lower() in ("none", "naive", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or 'none', got {text!r}")
    return value


def _budget(text: str) -> int:
    try:
        return parse_bytes(text)
    except RlparityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_memory_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("memory", help="per-rank memory of an RL training step: phase table and fit",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser, default=None,
                        model_help=f"{', '.join(REAL_SIZE)}, or a bundled model of fixtures/models (e.g. tiny)")
    parser.add_argument("--tokens", type=int, required=True,
                        help="tokens per rank in one micro-batch (divide by the Ulysses degree if you use it)")
    parser.add_argument("--world", type=int, default=1, help="FSDP ranks the state is sharded over (1: no FSDP)")
    parser.add_argument("--attention", default="triton", choices=ATTENTION_PATHS)
    parser.add_argument("--logprob-chunk", type=_chunk, default=DEFAULT_CHUNK, metavar="TOKENS|none",
                        help=f"tokens per log-prob chunk; 'none' for full-vocabulary logits (default {DEFAULT_CHUNK})")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every layer's activations (default: activation checkpointing per layer)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="compute dtype")
    parser.add_argument("--master-dtype", default="fp32", choices=tuple(DTYPES),
                        help="FSDP's sharded parameters, gradients and AdamW state (with --world > 1)")
    parser.add_argument("--budget", type=_budget, default=None, metavar="SIZE",
                        help="per-GPU memory to fit in, e.g. 80GiB")
    parser.add_argument("--verify", action="store_true",
                        help="also measure one decoder layer and the log-prob pass on the meta device")
    parser.set_defaults(run=memory_command)
    return parser


def _workload(args):
    import torch

    from rlparity.memory.analytic import Workload

    if args.tokens < 2:
        raise RlparityError(f"--tokens must be at least 2, got {args.tokens}")
    if args.world < 1:
        raise RlparityError(f"--world must be at least 1, got {args.world}")
    config = folder_config(args.checkpoint) if args.checkpoint else model_config(args.model)
    return Workload(config=config, tokens=args.tokens, dtype=getattr(torch, DTYPES[args.dtype]),
                    attention=args.attention, logprob_chunk=args.logprob_chunk, world=args.world,
                    master_dtype=getattr(torch, DTYPES[args.master_dtype]), checkpointing=args.checkpointing)


def memory_command(args) -> int:
    from rlparity.memory import analytic, table

    workload = _workload(args)
    estimate = analytic.estimate(workload)
    print(table.describe(args.model or f"checkpoint {args.checkpoint}", workload))
    limit = table.print_table(workload, estimate)
    if args.verify:
        table.verify(workload)
    if args.budget is None:
        return 0
    spare = args.budget - limit
    print(f"budget {format_bytes(args.budget)} per GPU: "
          + (f"fits ({format_bytes(spare)} to spare)" if spare >= 0 else f"does NOT fit ({format_bytes(-spare)} over)"))
    return 0 if spare >= 0 else 1
