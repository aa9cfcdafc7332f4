"""`rlparity routing`: per-layer routing agreement of two engines on the same sequences, and the near-tie census.

    rlparity routing --a hf --b vllm --model tiny
    rlparity routing --a reference --b hf --b-dtype bfloat16 --router-precision

Each engine routes each sequence alone (held-out text of the bundled synthetic language). Gaps are read
from --a's router logits: put the more precise side first. Exit status: 0 when every flip is at a
rounding-level gap, 1 when some flip is at a large gap (a bug, not rounding), 2 on bad arguments.
"""

import argparse
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.results import FAIL, ResultStore, default_results_path

DEFAULT_SEQUENCES, DEFAULT_LENGTH, DEFAULT_SEED = 8, 128, 11


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_routing_parser(subparsers) -> argparse.ArgumentParser:
    from rlparity.routing.engines import ROUTING_ENGINES

    parser = subparsers.add_parser("routing", help="per-layer MoE routing agreement of two engines, near-tie census",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, choices=ROUTING_ENGINES, help="first side (its logits give the gaps)")
    parser.add_argument("--b", required=True, choices=ROUTING_ENGINES)
    parser.add_argument("--a-dtype", default=None, help="e.g. float32, bfloat16, float64 (default: per engine)")
    parser.add_argument("--b-dtype", default=None)
    parser.add_argument("--model", default="tiny", help="a bundled model name or a checkpoint folder")
    parser.add_argument("--sequences", type=_positive, default=DEFAULT_SEQUENCES)
    parser.add_argument("--length", type=_positive, default=DEFAULT_LENGTH, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the held-out text")
    parser.add_argument("--router-precision", action="store_true",
                        help="also: each hf side's router alone in bf16 vs fp32 on the same hidden states")
    parser.add_argument("--results", default=None, help="JSON-lines results file")
    parser.set_defaults(run=routing_command)
    return parser


def resolve_model(model: str) -> Path:
    from rlparity.models import ensure_model, model_names

    if model in model_names():
        return ensure_model(model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise RlparityError(f"--model {model!r} is neither a bundled model ({', '.join(model_names())}) nor a "
                            f"checkpoint folder with a config.json")
    return path


def held_out_sequences(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    from rlparity.models import Language

    return next(Language(vocab_size, seed=0).batches(seed=seed, batch=count, seq_len=length))


def routing_command(args) -> int:
    from rlparity.engines.base import process_versions
    from rlparity.models import open_checkpoint
    from rlparity.routing.agreement import coarser_dtype, compare_routing
    from rlparity.routing.checks import agreement_record, precision_record
    from rlparity.routing.engines import engine_routes, open_routing_engine
    from rlparity.routing.precision import router_precision
    from rlparity.routing.report import agreement_table, census_table

    checkpoint = resolve_model(args.model)
    config = open_checkpoint(checkpoint).config
    sequences = held_out_sequences(config["vocab_size"], args.sequences, args.length, args.seed)
    shapes = {"sequences": args.sequences, "length": args.length, "seed": args.seed}
    results, engines = [], []
    try:
        for name, dtype in ((args.a, args.a_dtype), (args.b, args.b_dtype)):
            engines.append(open_routing_engine(name, checkpoint, dtype, max_len=args.length))
        a, b = engines
        names = (a.name, b.name) if a.name != b.name else (f"{a.name} (a)", f"{b.name} (b)")
        comparison = compare_routing(engine_routes(a, sequences), engine_routes(b, sequences),
                                     dtype=coarser_dtype(a.dtype, b.dtype), names=names)
        record = agreement_record(comparison, "agreement", shapes)
        record.engines = process_versions(a, b)
        results.append((comparison, record))
        if args.router_precision:
            for engine in engines:
                if hasattr(engine, "model") and hasattr(engine, "pad_id"):  # the hf engine: its transformers model
                    comparison = router_precision(engine.model, sequences, engine.pad_id, where=engine.name)
                    results.append((comparison, precision_record(comparison, engine.name, shapes)))
    finally:
        for engine in engines:
            engine.close()
    store = ResultStore(args.results or default_results_path("routing"))
    for comparison, record in results:
        print("\n".join(agreement_table(comparison.as_dict())))
        print("\n".join(census_table(comparison.as_dict())))
        print(f"{record.property}: {record.verdict}" + (f" ({record.reason})" if record.reason else "") + "\n")
        store.append(record)
    print(f"{store.count} records written to {store.path}")
    return 1 if any(record.verdict == FAIL for _, record in results) else 0
