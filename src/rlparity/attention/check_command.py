"""`rlparity check attention --backend NAME|module:function`: the sink-attention matrix against one backend.

Prints one row per checked cell (pass, fail, error) as it comes, then the skipped cells, one line per
distinct reason with its count, and writes every cell as a record. Exit status: 0 every checked cell
passed, 1 a cell failed or errored, 3 nothing was checked (no cell passed or failed; it prints
`nothing was checked for <backend>`). Bad input (unknown backend, module path, case or dtype) raises
RlparityError, which the `rlparity` command turns into exit 2 with one line.

A forward-only kernel has out and lse checked and its backward cells skipped; an lse-less one, which
returns (out, None), has lse and dsink_via_dlse skipped (rlparity.attention.matrix).
"""

import os

import torch

from rlparity.results import PASS, SKIP
from rlparity.tally import Tally


def check_attention(args) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import
    from rlparity.attention import get_backend
    from rlparity.attention.cases import CASES, CASES_BY_NAME, DTYPES_BY_NAME, named
    from rlparity.attention.matrix import SENSITIVITY_CASE, measure, sink_sensitivity, to_records
    from rlparity.results import ResultStore, default_results_path

    backend = get_backend(args.backend)
    dtypes = [DTYPES_BY_NAME[name] for name in named(DTYPES_BY_NAME, args.dtype, "dtype")]
    cases = [CASES_BY_NAME[name] for name in named(CASES_BY_NAME, args.case, "case")] if args.case else CASES
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = ResultStore(args.results or default_results_path("check-attention"))

    print(f"{'case':<22} {'dtype':<5} {'quantity':<17} {'error':>10} {'tolerance':>10}  verdict")
    tally = Tally(selected=[backend.name])
    sensitivity_case = CASES_BY_NAME[SENSITIVITY_CASE]
    for dtype in dtypes:
        runs = [(case, "sink_attention", measure) for case in cases]
        runs.append((sensitivity_case, "sink_sensitivity", sink_sensitivity))
        for case, prefix, check in runs:
            measurements = check(backend, case, dtype, device)
            for measurement, record in zip(measurements, to_records(backend, case, dtype, measurements, prefix)):
                store.append(record)
                tally.add(record)
                if record.verdict == SKIP:
                    continue
                error = "" if record.error is None else f"{record.error:.3g}"
                tol = "" if record.tolerance is None else f"{record.tolerance:.3g}"
                line = (f"{case.name:<22} {record.dtype:<5} {measurement.quantity:<17} {error:>10} {tol:>10}  "
                        f"{record.verdict}")
                if record.verdict != PASS:
                    line += f"  {record.reason}"
                print(line, flush=True)
    passing, skipped = tally.counts[(backend.name, PASS)], tally.counts[(backend.name, SKIP)]
    print(f"\n{backend.name}: {passing} passing, {tally.checked() - passing} failing cells, {skipped} skipped; "
          f"{store.count} records written to {store.path}")
    print("\n".join(tally.summary()))
    return tally.exit_status()
