"""python -m rlparity.parity {calibrate, compare, preflight, diff}

calibrate   measure the noise floors on the model's parity batch: a bundled model's into fixtures/noise_floors.json,
            a checkpoint's (--checkpoint DIR) into $RLPARITY_CACHE/noise_floors.json, keyed by its content hash
compare     every available pair of rlparity.parity.pairs.PARITY_PAIRS: preflight, metrics, verdict (a table)
preflight   the semantics preflight of one engine (a user's too: --engine NAME=module:Class) against a trainer
diff        the first diverging layer of two engines (the same as `rlparity diff`)

Exit status: 0 pass, 1 a failure, 2 bad input, 3 nothing was checked (every pair skipped: its engines cannot run here).
"""

import argparse
import sys
import time
from pathlib import Path

from rlparity.engine_option import add_engine_argument
from rlparity.errors import RlparityError
from rlparity.model_option import add_model_arguments, model_source
from rlparity.parity.batch import parity_batch
from rlparity.parity.diff_command import add_diff_parser, parse_option
from rlparity.parity.sides import EngineFailed, EnginePool, EngineUnavailable, Side


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _calibrate(args) -> int:
    from rlparity.parity.floors import calibrate, floors_path, save_floors

    started = time.monotonic()
    source = model_source(args)
    entry = calibrate(source, source.folder(log), parity_batch(source), log=log)
    path = save_floors(entry, Path(args.out) if args.out else floors_path(source))
    print(f"noise floors of {source.label!r} written to {path} ({time.monotonic() - started:.0f}s)")
    return 0


def _compare(args) -> int:
    from rlparity.parity.check import check_pair
    from rlparity.parity.check_command import result_lines, table_header, verdict, write_records
    from rlparity.parity.floors import load_floors
    from rlparity.parity.pairs import PARITY_PAIRS
    from rlparity.results import ResultStore, default_results_path

    source = model_source(args)
    batch = parity_batch(source)
    floors = load_floors(source, batch, Path(args.floors) if args.floors else None)
    print(table_header())
    results = []
    with EnginePool(source.folder(log), max_len=batch.max_len) as pool:
        for pair in PARITY_PAIRS:
            results.append(check_pair(pool, pair, batch, floors))
            print("\n".join(result_lines(results[-1])), flush=True)
    write_records(ResultStore(args.results or default_results_path("parity")), results, batch)
    return verdict(results, f"the parity pairs of {source.label}")


def _preflight(args) -> int:
    from rlparity.engine_option import register_engines
    from rlparity.parity.check import preflight_tolerance
    from rlparity.parity.floors import load_floors
    from rlparity.parity.pairs import pair_of
    from rlparity.parity.semantics import preflight
    from rlparity.tally import EXIT_NOTHING_CHECKED

    register_engines(args.engine)
    trainer = Side.parse(args.a, args.dtype, dict(args.a_option))
    engine = Side.parse(args.b, args.dtype, dict(args.b_option))
    pair = pair_of(trainer, engine)
    source = model_source(args)
    source.check_side_tokenizers((trainer, engine), log)
    batch = parity_batch(source)
    engines = "".join(f" --engine {spec}" for spec in args.engine)
    with EnginePool(source.folder(log), max_len=batch.max_len) as pool:
        try:
            a, b = pool.get(trainer), pool.get(engine)
            tolerance = args.tolerance
            if tolerance is None:
                floors = load_floors(source, batch, Path(args.floors) if args.floors else None)
                tolerance = preflight_tolerance(floors, pair, a.logprobs(batch.token_ids, batch.prompt_len))
            report = preflight(a, b, batch, tolerance,
                               diff_command=f"rlparity diff --a {args.a} --b {args.b}{engines} {source.argument}")
        except EngineUnavailable as exc:
            print(f"skipped: {exc}\nnothing was checked for {pair.label}")
            return EXIT_NOTHING_CHECKED
        except EngineFailed as exc:
            if isinstance(exc.__cause__, RlparityError):  # an engine refused its input: exit status 2
                raise RlparityError(str(exc)) from exc
            print(f"{pair.label}: error ({exc})")  # an engine failed to start or died: a failed check
            return 1
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlparity.parity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    calibrate = commands.add_parser("calibrate", help="measure the noise floors (fixtures/noise_floors.json)")
    add_model_arguments(calibrate)
    calibrate.add_argument("--out", default=None, help="floors file (default: fixtures/noise_floors.json for a "
                           "bundled model, $RLPARITY_CACHE/noise_floors.json for a checkpoint)")
    calibrate.set_defaults(run=_calibrate)
    compare = commands.add_parser("compare", help="every available pair: preflight, metrics, verdict")
    add_model_arguments(compare)
    compare.add_argument("--floors", default=None, help="floors file (default: where calibrate writes them)")
    compare.add_argument("--results", default=None, help="JSON-lines results file")
    compare.set_defaults(run=_compare)
    check = commands.add_parser("preflight", help="does the engine mean what the trainer means?")
    check.add_argument("--a", default="hf", metavar="ENGINE[:DTYPE]", help="the trainer side (default hf)")
    check.add_argument("--b", required=True, metavar="ENGINE[:DTYPE]", help="the engine side")
    check.add_argument("--dtype", default="float32")
    add_model_arguments(check)
    check.add_argument("--a-option", action="append", type=parse_option, default=[], metavar="KEY=JSON")
    check.add_argument("--b-option", action="append", type=parse_option, default=[], metavar="KEY=JSON")
    add_engine_argument(check)
    check.add_argument("--tolerance", type=float, default=None,
                       help="max |difference| of agreeing log-probs (default: from the model's noise floors)")
    check.add_argument("--floors", default=None, help="floors file (default: where calibrate writes them)")
    check.set_defaults(run=_preflight)
    add_diff_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RlparityError as exc:
        print(f"rlparity.parity: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
