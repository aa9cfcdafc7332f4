"""python -m rlparity.parity {calibrate, compare, preflight, diff}

calibrate   measure the noise floors of a bundled model on its parity batch; writes fixtures/noise_floors.json
compare     every available pair of rlparity.parity.pairs.PARITY_PAIRS: preflight, metrics, verdict (a table)
preflight   the semantics preflight of one engine against a trainer
diff        the first diverging layer of two engines (the same as `rlparity diff`)
"""

import argparse
import sys
import time
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.metrics import AGREEMENT_METRICS, cannot_fail
from rlparity.parity.batch import PARITY_MAX_LEN, parity_batch
from rlparity.parity.diff_command import add_diff_parser, parse_option
from rlparity.parity.sides import EngineFailed, EnginePool, EngineUnavailable, Side


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _calibrate(args) -> int:
    from rlparity.models import ensure_model
    from rlparity.parity.floors import calibrate, floors_path, save_floors

    started = time.monotonic()
    checkpoint = ensure_model(args.model, log=log)
    entry = calibrate(args.model, checkpoint, parity_batch(args.model), log=log)
    path = save_floors(entry, Path(args.out) if args.out else floors_path())
    print(f"noise floors of {args.model!r} written to {path} ({time.monotonic() - started:.0f}s)")
    return 0


def _compare(args) -> int:
    from rlparity.models import ensure_model
    from rlparity.parity.check import check_pair
    from rlparity.parity.floors import load_floors
    from rlparity.parity.pairs import PARITY_PAIRS
    from rlparity.results import ERROR, FAIL, ResultStore, default_results_path

    batch = parity_batch(args.model)
    floors = load_floors(args.model, batch, Path(args.floors) if args.floors else None)
    store = ResultStore(args.results or default_results_path("parity"))
    # the fractions outside [1 - e, 1 + e] are headed by e; Pearson is shown as 1 - r, its distance from agreement
    columns = [name.removeprefix("ratio_outside_").replace("prob_pearson", "1-pearson") for name in AGREEMENT_METRICS]
    print(f"{'pair':<28} {'verdict':<7} " + " ".join(f"{c:>10}" for c in columns) + f" {'tol(max)':>10} {'s':>5}")
    bad = 0
    with EnginePool(ensure_model(args.model, log=log), max_len=PARITY_MAX_LEN) as pool:
        for pair in PARITY_PAIRS:
            result = check_pair(pool, pair, batch, floors)
            for record in result.records(batch):
                store.append(record)
            bad += result.verdict in (FAIL, ERROR)
            values = dict(result.measurement.stats) if result.measurement else {}
            if values:
                values["prob_pearson"] = 1 - values["prob_pearson"]
            cells = " ".join(f"{values[m]:>10.3g}" if m in values else f"{'':>10}" for m in AGREEMENT_METRICS)
            tol = f"{result.tolerances['dlogp_max']:>10.3g}" if result.tolerances else f"{'':>10}"
            print(f"{pair.id:<28} {result.verdict:<7} {cells} {tol} {result.seconds:>5.1f}", flush=True)
            if result.verdict != "pass":
                print(f"    {result.reason}")
            if result.tolerances and (vacuous := cannot_fail(result.tolerances)):
                print(f"    cannot fail at this precision (the noise floor alone fills them): {', '.join(vacuous)}")
    print(f"{store.count} records written to {store.path}")
    return 1 if bad else 0


def _preflight(args) -> int:
    from rlparity.models import ensure_model
    from rlparity.parity.floors import load_floors
    from rlparity.parity.pairs import Pair
    from rlparity.parity.semantics import preflight

    trainer, engine = Side.parse(args.a, args.dtype), Side.parse(args.b, args.dtype, dict(args.b_option))
    batch = parity_batch(args.model)
    with EnginePool(ensure_model(args.model, log=log), max_len=PARITY_MAX_LEN) as pool:
        try:
            a, b = pool.get(trainer), pool.get(engine)
            tolerance = args.tolerance
            if tolerance is None:
                from rlparity.parity.check import preflight_tolerance

                floors = load_floors(args.model, batch)
                pair = Pair(trainer, engine, "cross" if trainer.dtype == engine.dtype else "naive")
                tolerance = preflight_tolerance(floors, pair, a.logprobs(batch.token_ids, batch.prompt_len))
            report = preflight(a, b, batch, tolerance, diff_command=f"rlparity diff --a {args.a} --b {args.b}")
        except (EngineUnavailable, EngineFailed) as exc:
            raise RlparityError(str(exc)) from exc
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlparity.parity", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    calibrate = commands.add_parser("calibrate", help="measure the noise floors (fixtures/noise_floors.json)")
    calibrate.add_argument("--model", default="tiny")
    calibrate.add_argument("--out", default=None, help="floors file (default: fixtures/noise_floors.json)")
    calibrate.set_defaults(run=_calibrate)
    compare = commands.add_parser("compare", help="every available pair: preflight, metrics, verdict")
    compare.add_argument("--model", default="tiny")
    compare.add_argument("--floors", default=None, help="floors file (default: fixtures/noise_floors.json)")
    compare.add_argument("--results", default=None, help="JSON-lines results file")
    compare.set_defaults(run=_compare)
    check = commands.add_parser("preflight", help="does the engine mean what the trainer means?")
    check.add_argument("--a", default="hf", metavar="ENGINE[:DTYPE]", help="the trainer side (default hf)")
    check.add_argument("--b", required=True, metavar="ENGINE[:DTYPE]", help="the engine side")
    check.add_argument("--dtype", default="float32")
    check.add_argument("--model", default="tiny")
    check.add_argument("--b-option", action="append", type=parse_option, default=[], metavar="KEY=JSON")
    check.add_argument("--tolerance", type=float, default=None,
                       help="max |difference| of agreeing log-probs (default: from the model's noise floors)")
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
