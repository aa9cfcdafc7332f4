"""rlparity check parity: one trainer/engine pair on the model's parity batch: the semantics preflight, the agreement
metrics against the pair's noise floor, the verdict.

    rlparity check parity --a hf:float32 --b vllm:float32
    rlparity check parity --a hf:float32 --b mine:float32 --engine mine=my_engine:MyEngine
    rlparity check parity --a hf:bf16 --b mine:bf16 --engine mine=my_engine:MyEngine --b-option 'device="cuda"'
    rlparity check parity --checkpoint ./my-gpt-oss --calibrate --a hf:float32 --b vllm:float32   # your model

The pair is judged as the bundled pairs of its kind are (rlparity.parity.pairs.pair_of): two engines in one dtype
against the 'cross' noise floor of that dtype, two dtypes against the coarser one's 'naive' floor, one side against
itself in other batch layouts against the 'self' floor. One record per check goes to the results file (the
preflight's and the pair's). Exit status: 0 the pair passes, 1 it fails (or an engine failed), 2 bad input, 3 nothing
was checked (the pair was skipped: an engine cannot run here, with the reason).
"""

import argparse
import sys
from pathlib import Path

# Only the standard library is imported until the command runs: adding this parser to a command line is free.
from rlparity.engine_option import add_engine_argument, register_engines
from rlparity.model_option import add_model_arguments, model_source
from rlparity.parity.diff_command import parse_option


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_check_parity_parser(checks) -> argparse.ArgumentParser:
    """Adds `parity` to `rlparity check`'s subparsers; its `run` default is run_check_parity(args) -> exit status."""
    parser = checks.add_parser("parity", help="one trainer/engine pair: semantics preflight, metrics, verdict",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="hf", metavar="ENGINE[:DTYPE]", help="the trainer side (default hf)")
    parser.add_argument("--b", required=True, metavar="ENGINE[:DTYPE]", help="the engine side, e.g. vllm:bf16")
    parser.add_argument("--dtype", default="float32", help="dtype of a side given without one (default float32)")
    add_model_arguments(parser)
    parser.add_argument("--floors", default=None, help="noise floors file (default: fixtures/noise_floors.json for a "
                        "bundled model, $RLPARITY_CACHE/noise_floors.json for a checkpoint)")
    parser.add_argument("--calibrate", action="store_true", help="measure the model's noise floors first and store "
                        "them (as `python -m rlparity.parity calibrate` does): a new checkpoint has none")
    parser.add_argument("--results", default=None, help="JSON-lines results file (default results/check-parity-*)")
    parser.add_argument("--a-option", action="append", type=parse_option, default=[], metavar="KEY=JSON",
                        help="constructor option of side a (repeatable)")
    parser.add_argument("--b-option", action="append", type=parse_option, default=[], metavar="KEY=JSON",
                        help="constructor option of side b (repeatable)")
    add_engine_argument(parser)
    parser.set_defaults(run=run_check_parity)
    return parser


def run_check_parity(args: argparse.Namespace) -> int:
    from rlparity.parity.batch import parity_batch
    from rlparity.parity.check import check_pair
    from rlparity.parity.floors import calibrate, load_floors, save_floors
    from rlparity.parity.pairs import pair_of
    from rlparity.parity.sides import EnginePool, Side
    from rlparity.results import ResultStore, default_results_path

    register_engines(args.engine)
    pair = pair_of(Side.parse(args.a, args.dtype, dict(args.a_option)),
                   Side.parse(args.b, args.dtype, dict(args.b_option)))
    source = model_source(args)
    source.check_side_tokenizers((pair.a, pair.b), log)
    batch = parity_batch(source)
    floors_file = Path(args.floors) if args.floors else None
    if args.calibrate:
        log(f"measuring the noise floors of {source.label} ({len(batch.token_ids)} sequences)")
        floors_file = save_floors(calibrate(source, source.folder(log), batch, log=log), floors_file)
    floors = load_floors(source, batch, floors_file)
    with EnginePool(source.folder(log), max_len=batch.max_len) as pool:
        result = check_pair(pool, pair, batch, floors)
    if result.preflight is not None:
        print("\n".join(result.preflight.lines()) + "\n")
    print(table_header())
    print("\n".join(result_lines(result)))
    store = ResultStore(args.results or default_results_path("check-parity"))
    write_records(store, [result], batch)
    return verdict([result], pair.label)


def table_header() -> str:
    from rlparity.metrics import AGREEMENT_METRICS

    # the fractions outside [1 - e, 1 + e] are headed by e; Pearson is shown as 1 - r, its distance from agreement
    columns = [name.removeprefix("ratio_outside_").replace("prob_pearson", "1-pearson") for name in AGREEMENT_METRICS]
    return f"{'pair':<28} {'verdict':<7} " + " ".join(f"{c:>10}" for c in columns) + f" {'tol(max)':>10} {'s':>5}"


def result_lines(result) -> list[str]:
    """A PairResult's row of the table, then its reason and the metrics that cannot fail, if any."""
    from rlparity.metrics import AGREEMENT_METRICS, cannot_fail
    from rlparity.results import PASS, SKIP

    values = dict(result.measurement.stats) if result.measurement else {}
    if values:
        values["prob_pearson"] = 1 - values["prob_pearson"]
    cells = " ".join(f"{values[m]:>10.3g}" if m in values else f"{'':>10}" for m in AGREEMENT_METRICS)
    tol = f"{result.tolerances['dlogp_max']:>10.3g}" if result.tolerances else f"{'':>10}"
    lines = [f"{result.pair.id:<28} {result.verdict:<7} {cells} {tol} {result.seconds:>5.1f}"]
    if result.verdict not in (PASS, SKIP):  # skips are summarised by reason at the end (verdict)
        lines.append(f"    {result.reason}")
    if result.tolerances and (vacuous := cannot_fail(result.tolerances)):
        lines.append(f"    cannot fail at this precision (the noise floor alone fills them): {', '.join(vacuous)}")
    return lines


def write_records(store, results, batch) -> None:
    for result in results:
        for record in result.records(batch):
            store.append(record)
    print(f"{store.count} records written to {store.path}")


def verdict(results, subject: str) -> int:
    """Prints the skips, one line per distinct reason with its count, and `nothing was checked for <subject>` when
    every pair was skipped; the exit status (rlparity.tally)."""
    from rlparity.tally import Tally

    tally = Tally()
    for result in results:
        tally.count(result.pair.label, result.verdict, result.reason)
    if lines := tally.summary(everything=subject):
        print("\n".join(lines))
    return tally.exit_status()
