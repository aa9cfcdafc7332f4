"""Known findings: cells of third-party code that fail for a reason already reduced, written up and reported.

A finding stays in the matrix and its cells keep the verdict `fail` in every record. A run given the findings
file (`--known-findings fixtures/findings.json`, as rlparity's own CI passes it) expects exactly those cells to
fail: they do not fail the run, and the summary names them. A listed cell that passes fails the run instead (the
engine fixed it: remove the entry), and a new version of the engine is not covered by an entry for the old one.

    [{"id": "sglang-triton-swa-decode-window",
      "package": "sglang", "version": "0.5.23",            # the installed version the entry is about
      "subject": "sglang_p*_decode", "case": "window_edge_query|decode_batch_window",
      "property": "sink_attention.out", "dtype": "fp32|fp16",   # fnmatch patterns, '|' separated
      "summary": "one line: what is wrong", "reference": "README section or upstream issue"}]
"""

import fnmatch
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rlparity.errors import RlparityError

MATCHED_FIELDS = ("subject", "case", "property", "dtype")
REQUIRED_FIELDS = ("id", "package", "version", *MATCHED_FIELDS, "summary")


@dataclass(frozen=True)
class Finding:
    id: str
    package: str
    version: str
    subject: str
    case: str
    property: str
    dtype: str
    summary: str
    reference: str = ""

    def applies(self) -> bool:
        """Whether the package the finding is about is installed here at the version it names."""
        try:
            return metadata.version(self.package) == self.version
        except metadata.PackageNotFoundError:
            return False

    def matches(self, record) -> bool:
        return all(any(fnmatch.fnmatchcase(str(getattr(record, name)), pattern)
                       for pattern in getattr(self, name).split("|"))
                   for name in MATCHED_FIELDS)

    def describe(self) -> str:
        return f"{self.id} ({self.package} {self.version}): {self.summary}"


def load_findings(path: Path | str) -> list["Finding"]:
    """The findings of `path` that apply to the installed packages; a malformed file is a one-line error."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RlparityError(f"known findings {path}: cannot read a JSON list: {exc}") from exc
    if not isinstance(entries, list):
        raise RlparityError(f"known findings {path}: expected a JSON list of findings, got {type(entries).__name__}")
    findings = []
    for i, entry in enumerate(entries):
        missing = [name for name in REQUIRED_FIELDS if not isinstance(entry, dict) or name not in entry]
        if missing:
            raise RlparityError(f"known findings {path}: entry {i} lacks {', '.join(missing)}")
        unknown = set(entry) - set(Finding.__dataclass_fields__)
        if unknown:
            raise RlparityError(f"known findings {path}: entry {i} has unknown fields {sorted(unknown)}")
        findings.append(Finding(**entry))
    return [finding for finding in findings if finding.applies()]


def matching(findings: list[Finding], record) -> Finding | None:
    return next((finding for finding in findings if finding.matches(record)), None)
