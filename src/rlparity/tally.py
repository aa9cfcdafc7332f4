"""Verdicts of a run, counted the same way by every `rlparity check ...` command and the conformance suite.

Exit status everywhere: 0 every checked cell passed, 1 a cell failed (or errored), 2 usage or input error,
3 nothing was checked: no cell passed or failed, or none of a component the user selected. A failing cell that
is a known finding (rlparity.findings) is counted as `known` and does not fail the run; a known finding's cell
that passes (`fixed`) does.
"""

import re
from collections import Counter

from rlparity.results import ERROR, FAIL, PASS, SKIP, Record

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_NOTHING_CHECKED = 0, 1, 2, 3
KNOWN, FIXED = "known", "fixed"  # a known finding's cell that failed as expected, or passed
# an error is a checked cell that failed: the component ran and broke
CHECKED = (PASS, FAIL, ERROR, KNOWN, FIXED)
FAILED = (FAIL, ERROR, FIXED)


def names(component: str, subject: str) -> bool:
    """Whether `subject` names `component` as a whole name: `mine` in `hf[float32] vs mine[float32]`, and
    `vllm_triton_p1` not in `vllm_triton_p16`."""
    return re.search(rf"(?<![\w.:-]){re.escape(component)}(?![\w.:-])", subject) is not None


class Tally:
    """Counts by subject and verdict, skips by reason.

    `selected` are the user's components, each of which must have a checked cell; a component is credited with
    every record whose subject names it (a user engine `mine` with `hf[float32] vs mine[float32]`). `known` are
    the findings (rlparity.findings) whose cells are expected to fail."""

    def __init__(self, selected=(), known=()):
        self.counts: Counter = Counter()  # (subject, verdict) -> cells
        self.skip_reasons: Counter = Counter()
        self.selected = list(selected)
        self.known = list(known)
        self.findings: Counter = Counter()  # (finding, KNOWN or FIXED) -> cells

    def add(self, *records: Record) -> None:
        for record in records:
            verdict, finding = self.classify(record)
            if finding is not None:
                self.findings[(finding, verdict)] += 1
            self.count(record.subject, verdict, record.reason)

    def classify(self, record: Record):
        """(the record's verdict, or KNOWN / FIXED for a cell of a known finding; that finding or None)."""
        from rlparity.findings import matching

        finding = matching(self.known, record) if record.verdict in (PASS, FAIL) else None
        if finding is None:
            return record.verdict, None
        return (KNOWN if record.verdict == FAIL else FIXED), finding

    def count(self, subject: str, verdict: str, reason: str = "") -> None:
        self.counts[(subject, verdict)] += 1
        if verdict == SKIP:
            self.skip_reasons[reason] += 1

    def checked(self, component: str | None = None) -> int:
        return sum(n for (subject, verdict), n in self.counts.items()
                   if verdict in CHECKED and (component is None or names(component, subject)))

    def unchecked(self) -> list[str]:
        return [component for component in self.selected if not self.checked(component)]

    @property
    def failed(self) -> bool:
        return any(verdict in FAILED for _, verdict in self.counts)

    def exit_status(self) -> int:
        if self.failed:
            return EXIT_FAIL
        return EXIT_NOTHING_CHECKED if not self.checked() or self.unchecked() else EXIT_PASS

    def subject_table(self) -> list[str]:
        columns = [PASS, FAIL, ERROR, SKIP] + [v for v in (KNOWN, FIXED) if any(k == v for _, k in self.counts)]
        lines = [f"{'subject':<56} " + " ".join(f"{column:>6}" for column in columns)]
        for subject in sorted({subject for subject, _ in self.counts}):
            row = [self.counts[(subject, verdict)] for verdict in columns]
            lines.append(f"{subject:<56} " + " ".join(f"{n:>6}" for n in row))
        return lines

    def summary(self, everything: str | None = None) -> list[str]:
        """The skips, one line per distinct reason with its count, then what was not checked (`everything` names
        the whole run in `nothing was checked for ...` when no cell at all was)."""
        lines = []
        for (finding, verdict), cells in self.findings.items():
            if verdict == KNOWN:
                lines.append(f"known finding, {cells} cells failed as expected: {finding.describe()}")
            else:
                lines.append(f"known finding no longer reproduces, {cells} cells passed: {finding.describe()} "
                             f"(remove it from the findings file)")
        if self.skip_reasons:
            lines.append("skipped, by reason:")
            lines += [f"  {count:>5} x {reason}" for reason, count in self.skip_reasons.most_common()]
        unchecked = self.unchecked()
        lines += [f"nothing was checked for {component}" for component in unchecked]
        if not self.checked() and not unchecked:
            lines.append(f"nothing was checked for {everything}" if everything else
                         "nothing was checked: no cell passed or failed")
        return lines
