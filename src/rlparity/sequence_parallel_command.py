"""`rlparity check sequence-parallel`: one or more sequence-parallel attentions on 1, 2 and 4 ranks.

    rlparity check sequence-parallel --impl mypkg.sp:attend --world 2 --world 4

Each implementation (a registered name, "ulysses" or "ring", or "module:function"; the interface is
written down in rlparity.parallel.interface) runs on every rank of a process group (gloo on CPU,
nccl where every rank has a GPU) on the sequence-parallel cases, and out, lse, dq, dk, dv and the
summed dSink (via dO and via dLSE) are judged against the float64 reference on the whole sequence
(rlparity.parallel.check). Exit 0: every checked cell passed; 1: a cell failed or errored; 2: usage
or input error; 3: nothing was checked for an implementation (every cell skipped).
"""

import os

# Only the standard library and rlparity's light modules until the command runs: the `rlparity` command builds
# every subcommand's parser, and torch loads only for the one that runs.
from rlparity.errors import RlparityError
from rlparity.results import ERROR, FAIL, PASS, SKIP, ResultStore, default_results_path
from rlparity.tally import Tally

DEFAULT_WORLDS = (1, 2, 4)


def add_sequence_parallel_parser(checks) -> None:
    """`sequence-parallel` under the `check` subcommands."""
    parser = checks.add_parser("sequence-parallel", help="a sequence-parallel attention on several ranks against "
                               "the float64 reference on the whole sequence")
    parser.add_argument("--impl", action="append", required=True,
                        help="ulysses, ring or module:function (repeatable)")
    parser.add_argument("--world", action="append", type=int, default=None,
                        help="ranks in the process group (repeatable; default: 1, 2 and 4)")
    parser.add_argument("--inner", default=None,
                        help="attention backend for the per-rank kernel of implementations that take `inner` "
                             "(rlparity's own: default chunked)")
    parser.add_argument("--case", default="", help="comma-separated sequence-parallel case names (default: all)")
    parser.add_argument("--dtype", default=None, help="comma-separated: fp32, bf16, fp16, fp64 (default: fp32,bf16)")
    parser.add_argument("--process-group", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: nccl where there is a GPU per rank, else gloo on the CPU")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a rank waits for its peers in a collective before the case errors "
                             "(default: rlparity.parallel.launch.COLLECTIVE_TIMEOUT_S)")
    parser.add_argument("--results", default=None, help="JSON-lines results file")
    parser.set_defaults(run=run)


def _process_group(choice: str, world: int) -> str:
    import torch

    if choice == "auto":
        return "nccl" if torch.cuda.device_count() >= world else "gloo"
    return choice


class _Tally(Tally):
    """The shared tally, with errors kept whole (with the rank's traceback), printed once per distinct first line."""

    def __init__(self, names):
        super().__init__(selected=names)
        self.errors = {}  # first line -> [the whole message, cells]

    def add(self, *records) -> None:
        for record in records:
            if record.verdict == ERROR:
                first_line = (record.reason.splitlines() or [""])[0]
                self.errors.setdefault(first_line, [record.reason, 0])[1] += 1
        super().add(*records)

    def print_summary(self) -> None:
        for whole, count in self.errors.values():
            print(f"\n{count} cells errored with:\n{whole}")
        print()
        for name in self.selected:
            counts = {verdict: self.counts[(name, verdict)] for verdict in (PASS, FAIL, ERROR, SKIP)}
            print(f"{name}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[ERROR]} errored, "
                  f"{counts[SKIP]} skipped")
        print("\n".join(self.summary()))


def run(args) -> int:
    import torch

    from rlparity.attention.cases import DTYPES_BY_NAME, named
    from rlparity.parallel.check import SP_CASES, SP_CASES_BY_NAME, SP_DTYPES, MeasureGroup, to_records
    from rlparity.parallel.interface import get_implementation
    from rlparity.parallel.launch import COLLECTIVE_TIMEOUT_S

    worlds = args.world or list(DEFAULT_WORLDS)
    if any(world < 1 for world in worlds):
        raise RlparityError(f"--world counts ranks and must be >= 1, got {worlds}")
    timeout = COLLECTIVE_TIMEOUT_S if args.timeout is None else args.timeout
    if timeout <= 0:
        raise RlparityError(f"--timeout is in seconds and must be > 0, got {timeout}")
    implementations = [get_implementation(target, args.inner) for target in args.impl]
    cases = [case.name for case in SP_CASES] if not args.case else named(SP_CASES_BY_NAME, args.case, "case")
    dtypes = named(DTYPES_BY_NAME, args.dtype or ",".join(SP_DTYPES), "dtype")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # an inner Triton kernel runs interpreted on the CPU
    store = ResultStore(args.results or default_results_path("check-sequence-parallel"))

    tally = _Tally(implementation.name for implementation in implementations)
    width = max(len("implementation"), *(len(implementation.name) for implementation in implementations))
    print(f"{'implementation':<{width}} {'world':>5} {'case':<17} {'dtype':<5} {'quantity':<15} {'error':>10} "
          f"{'tolerance':>10}  verdict", flush=True)
    for world in worlds:
        process_group = _process_group(args.process_group, world)
        group = MeasureGroup(world, backend=process_group, collective_timeout_s=timeout)
        try:
            for implementation in implementations:
                for case in cases:
                    for dtype in dtypes:
                        records = to_records(implementation, case, dtype, world, group.measure(implementation, case,
                                                                                               dtype))
                        for record in records:
                            record.extra["process_group"] = process_group
                            store.append(record)
                        tally.add(*records)
                        _print_case(f"{implementation.name:<{width}} {world:>5} {case:<17} {dtype:<5}", records)
        finally:
            group.close()

    print(f"{store.count} records written to {store.path}")
    tally.print_summary()
    return tally.exit_status()


def _print_case(prefix: str, records) -> None:
    """The checked cells of one case; a case that errored as a whole (a rank failed) in one line."""
    if {record.verdict for record in records} == {ERROR} and len({record.reason for record in records}) == 1:
        print(f"{prefix} {'every quantity':<15} {'':>10} {'':>10}  {ERROR}  {records[0].reason.splitlines()[0]}",
              flush=True)
        return
    for record in records:
        if record.verdict == SKIP:
            continue
        error = "" if record.error is None else f"{record.error:.3g}"
        tol = "" if record.tolerance is None else f"{record.tolerance:.3g}"
        quantity = record.property.removeprefix("sequence_parallel.")
        line = f"{prefix} {quantity:<15} {error:>10} {tol:>10}  {record.verdict}"
        if record.verdict != PASS:
            line += f"  {(record.reason.splitlines() or [''])[0]}"
        print(line, flush=True)
