"""`rlparity routing`: per-layer routing agreement of two engines on the same sequences, and the near-tie census.

    rlparity routing --a hf --b vllm --model tiny
    rlparity routing --a reference --b hf --b-dtype bfloat16 --router-precision

Each engine routes each sequence alone (held-out text of the bundled synthetic language; with --checkpoint DIR,
consecutive blocks of the parity prompt set in the checkpoint's own tokenizer). Gaps are read
from --a's router logits: put the more precise side first. Your engine is a side too when it has
routing(token_ids): --engine mine=my_engine:MyEngine --b mine. Exit status: 0 when every flip is at a
rounding-level gap, 1 when some flip is at a large gap (a bug, not rounding), 2 on bad arguments, 3 when
nothing could be compared (an engine cannot run here).

    rlparity routing --replay none --replay ids --replay ids+weights --replay r2 --a hf --a-dtype bfloat16 \
        --b vllm --b-dtype bfloat16

With --replay, --a is the trainer (hf) and the table compares router-replay variants (rlparity.routing.variants)
against --b and against the float64 reference: the training pass's |dlogp| to the engine, routes, router
gradients, PPO ratio. Exit status 1 when a replay forced routes that did not run, or gradients are not where the
variant keeps them.
"""

import argparse

from rlparity.engine_option import add_engine_argument, register_engines
from rlparity.errors import RlparityError
from rlparity.model_option import add_model_arguments, model_source
from rlparity.parity.diff_command import parse_option
from rlparity.results import ERROR, FAIL, ResultStore, default_results_path
from rlparity.tally import EXIT_NOTHING_CHECKED

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
    from rlparity.routing.variants import REPLAY_CHOICES

    parser = subparsers.add_parser("routing", help="per-layer MoE routing agreement of two engines, near-tie census",
                                   description=__doc__.splitlines()[0])
    engines = f"{', '.join(ROUTING_ENGINES)}, or yours given with --engine"
    parser.add_argument("--a", required=True, metavar="ENGINE",
                        help=f"first side (its logits give the gaps): {engines}")
    parser.add_argument("--b", required=True, metavar="ENGINE", help=engines)
    parser.add_argument("--a-dtype", default=None, help="e.g. float32, bfloat16, float64 (default: per engine)")
    parser.add_argument("--b-dtype", default=None)
    add_model_arguments(parser, model_help="a bundled model (micro, tiny; default tiny), or a checkpoint folder as "
                        "--checkpoint takes it")
    parser.add_argument("--sequences", type=_positive, default=DEFAULT_SEQUENCES)
    parser.add_argument("--length", type=_positive, default=DEFAULT_LENGTH, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of a bundled model's held-out text")
    parser.add_argument("--a-option", action="append", type=parse_option, default=[], metavar="KEY=JSON",
                        help="constructor option of side a (repeatable), e.g. tensor_parallel_size=4 for vllm")
    parser.add_argument("--b-option", action="append", type=parse_option, default=[], metavar="KEY=JSON",
                        help="constructor option of side b (repeatable)")
    parser.add_argument("--router-precision", action="store_true",
                        help="also: each hf side's router alone in bf16 vs fp32 on the same hidden states")
    parser.add_argument("--replay", action="append", choices=REPLAY_CHOICES, default=[],
                        help="router-replay variants to compare, --a being the trainer (repeatable; 'ids' also "
                             "measures its ids in reversed slot order)")
    parser.add_argument("--results", default=None, help="JSON-lines results file")
    add_engine_argument(parser)
    parser.set_defaults(run=routing_command)
    return parser


def held_out_sequences(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    from rlparity.models import Language

    return next(Language(vocab_size, seed=0).batches(seed=seed, batch=count, seq_len=length))


def prompt_set_sequences(source, count: int, length: int) -> list[list[int]]:
    """`count` consecutive blocks of `length` tokens of the checkpoint's parity prompt set, texts end to end."""
    from rlparity.parity.batch import parity_batch

    stream = [token for sequence in parity_batch(source).token_ids for token in sequence]
    if count * length > len(stream):
        raise RlparityError(f"routing: {count} sequences of {length} tokens need {count * length} tokens; the parity "
                            f"prompt set is {len(stream)} tokens in the tokenizer of {source.checkpoint}: ask for "
                            f"fewer --sequences or a shorter --length")
    return [stream[i * length:(i + 1) * length] for i in range(count)]


def routing_command(args) -> int:
    from rlparity.engines import EngineUnavailable
    from rlparity.engines.base import process_versions
    from rlparity.engines.process import EngineProcessError
    from rlparity.routing.agreement import coarser_dtype, compare_routing
    from rlparity.routing.checks import agreement_record, engine_error_record, precision_record
    from rlparity.routing.engines import engine_routes, open_routing_engine, require_routing_engine
    from rlparity.routing.precision import router_precision
    from rlparity.routing.report import agreement_table, census_table

    register_engines(args.engine)
    for name in (args.a, args.b):
        require_routing_engine(name)
    if args.replay and args.a != "hf":
        raise RlparityError(f"routing --replay: --a is the trainer and must be hf (transformers), got {args.a!r}")
    source = model_source(args)
    if source.checkpoint is None:
        sequences = held_out_sequences(source.config()["vocab_size"], args.sequences, args.length, args.seed)
    else:
        sequences = prompt_set_sequences(source, args.sequences, args.length)
    checkpoint = source.folder()
    shapes = {"sequences": args.sequences, "length": args.length, "seed": args.seed, "model": source.label}
    if args.replay:
        from rlparity.routing.replay_command import replay_command

        return replay_command(args, checkpoint, sequences, shapes)
    options = (dict(args.a_option), dict(args.b_option))
    results, engines = [], []
    try:
        try:
            for name, dtype, side_options in zip((args.a, args.b), (args.a_dtype, args.b_dtype), options):
                try:
                    engines.append(open_routing_engine(name, checkpoint, dtype, max_len=args.length, **side_options))
                except EngineUnavailable as exc:
                    print(f"skipped: {exc}\nnothing was checked for routing {args.a} vs {args.b}")
                    return EXIT_NOTHING_CHECKED
            a, b = engines
            names = (a.name, b.name) if a.name != b.name else (f"{a.name} (a)", f"{b.name} (b)")
            comparison = compare_routing(engine_routes(a, sequences), engine_routes(b, sequences),
                                         dtype=coarser_dtype(a.dtype, b.dtype), names=names)
            record = agreement_record(comparison, "agreement", shapes)
            record.engines = process_versions(a, b)
            results.append((comparison, record))
        except EngineProcessError as exc:  # an engine died, hung or answered wrong: this check's error, the run goes on
            subject = f"{args.b} vs {args.a}"
            results.append((None, engine_error_record("agreement", subject, exc, shapes)))
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
        if comparison is not None:
            print("\n".join(agreement_table(comparison.as_dict())))
            print("\n".join(census_table(comparison.as_dict())))
        print(f"{record.property}: {record.verdict}" + (f" ({record.reason})" if record.reason else "") + "\n")
        store.append(record)
    print(f"{store.count} records written to {store.path}")
    return 1 if any(record.verdict in (FAIL, ERROR) for _, record in results) else 0
