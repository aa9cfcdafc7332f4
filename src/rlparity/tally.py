"""Verdicts of a run, counted the same way by every `rlparity check ...` command and the conformance suite.

Exit status everywhere: 0 every checked cell passed, 1 a cell failed (or errored), 2 usage or input error,
3 nothing was checked: no cell passed or failed, or none of a component the user selected.
"""

from collections import Counter

from rlparity.results import ERROR, FAIL, PASS, SKIP, Record

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_NOTHING_CHECKED = 0, 1, 2, 3
CHECKED = (PASS, FAIL, ERROR)  # an error is a checked cell that failed: the component ran and broke


class Tally:
    """Counts by subject and verdict, skips by reason.

    `selected` are the user's components, each of which must have a checked cell; a component is credited with
    every record whose subject contains its name (a user engine `mine` with `hf[float32] vs mine[float32]`)."""

    def __init__(self, selected=()):
        self.counts: Counter = Counter()  # (subject, verdict) -> cells
        self.skip_reasons: Counter = Counter()
        self.selected = list(selected)

    def add(self, *records: Record) -> None:
        for record in records:
            self.count(record.subject, record.verdict, record.reason)

    def count(self, subject: str, verdict: str, reason: str = "") -> None:
        self.counts[(subject, verdict)] += 1
        if verdict == SKIP:
            self.skip_reasons[reason] += 1

    def checked(self, component: str | None = None) -> int:
        return sum(n for (subject, verdict), n in self.counts.items()
                   if verdict in CHECKED and (component is None or component in subject))

    def unchecked(self) -> list[str]:
        return [component for component in self.selected if not self.checked(component)]

    @property
    def failed(self) -> bool:
        return any(verdict in (FAIL, ERROR) for _, verdict in self.counts)

    def exit_status(self) -> int:
        if self.failed:
            return EXIT_FAIL
        return EXIT_NOTHING_CHECKED if not self.checked() or self.unchecked() else EXIT_PASS

    def subject_table(self) -> list[str]:
        lines = [f"{'subject':<56} {'pass':>6} {'fail':>6} {'error':>6} {'skip':>6}"]
        for subject in sorted({subject for subject, _ in self.counts}):
            row = [self.counts[(subject, verdict)] for verdict in (PASS, FAIL, ERROR, SKIP)]
            lines.append(f"{subject:<56} " + " ".join(f"{n:>6}" for n in row))
        return lines

    def summary(self, everything: str | None = None) -> list[str]:
        """The skips, one line per distinct reason with its count, then what was not checked (`everything` names
        the whole run in `nothing was checked for ...` when no cell at all was)."""
        lines = []
        if self.skip_reasons:
            lines.append("skipped, by reason:")
            lines += [f"  {count:>5} x {reason}" for reason, count in self.skip_reasons.most_common()]
        unchecked = self.unchecked()
        lines += [f"nothing was checked for {component}" for component in unchecked]
        if not self.checked() and not unchecked:
            lines.append(f"nothing was checked for {everything}" if everything else
                         "nothing was checked: no cell passed or failed")
        return lines
