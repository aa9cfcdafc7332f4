"""Injecting faults into engine processes from outside, and counting the processes a run leaves behind.

Processes are read from /proc (Linux): each one's parent, process group and session, and its command line.
An engine process runs in a session of its own (rlparity.engines.process starts it with start_new_session), so
its session id is its pid, inherited by anything it spawns.
"""

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rlparity.engines.process import launch_worker
from rlparity.engines.vllm import VllmEngine, find_vllm_python

VLLM_WORKER_MODULE = "rlparity.engines.vllm_worker"
POLL_S = 0.05


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    cmdline: str


def processes() -> list[ProcessInfo]:
    """Every process visible in /proc now (one that ends while being read is left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may itself hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        found.append(ProcessInfo(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), fields[0],
                                 cmdline.strip()))
    return found


def descendants(root: int, table: list[ProcessInfo] | None = None) -> list[ProcessInfo]:
    """The processes whose parent chain leads to `root` (not `root` itself)."""
    table = processes() if table is None else table
    children: dict[int, list[ProcessInfo]] = {}
    for process in table:
        children.setdefault(process.ppid, []).append(process)
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child.pid)
    return found


def left_alive(engine_pids=(), root: int | None = None) -> list[ProcessInfo]:
    """Processes of a run still alive: in the session or process group of any of `engine_pids` (an engine and what
    it spawned, even if re-parented to init), or below `root` (default: this process). Zombies count: a process
    nobody reaped is a leak too."""
    table = processes()
    engine_pids = set(engine_pids)
    in_engine = [p for p in table if p.sid in engine_pids or p.pgid in engine_pids or p.pid in engine_pids]
    below = descendants(os.getpid() if root is None else root, table)
    return sorted({p.pid: p for p in in_engine + below}.values(), key=lambda p: p.pid)


def find_worker(root: int, module: str = VLLM_WORKER_MODULE) -> ProcessInfo | None:
    """The engine worker started below `root` (e.g. an `rlparity` command), found by its command line."""
    return next((p for p in descendants(root) if f"-m {module}" in p.cmdline), None)


def log_of(pid: int) -> Path | None:
    """The file a process writes its stdout to (an engine process: its log), None if that is no file."""
    try:
        target = Path(os.readlink(f"/proc/{pid}/fd/1"))
    except OSError:
        return None
    return target if target.is_file() else None


def log_contains(pid: int, text: str) -> bool:
    log = log_of(pid)
    try:
        return log is not None and text in log.read_text(errors="replace")
    except OSError:
        return False


class KillWhenStarted:
    """Watches for an engine worker below `root` and sends it `signum` once its log holds `after_log` (if given), then
    `delay` seconds: a real kill from outside, as a user or the OOM killer would. `pid` and `sent_at`
    (time.monotonic) say when it was sent."""

    def __init__(self, root: int, delay: float = 0.0, signum: int = signal.SIGKILL, after_log: str | None = None,
                 timeout: float = 120.0, module: str = VLLM_WORKER_MODULE):
        self.root, self.delay, self.signum, self.timeout, self.module = root, delay, signum, timeout, module
        self.after_log = after_log
        self.pid: int | None = None
        self.sent_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "KillWhenStarted":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._stop.is_set() and time.monotonic() < deadline:
            worker = find_worker(self.root, self.module)
            if worker is not None and (self.after_log is None or log_contains(worker.pid, self.after_log)):
                if self._stop.wait(self.delay):
                    return
                try:
                    os.kill(worker.pid, self.signum)
                except ProcessLookupError:
                    return
                self.pid, self.sent_at = worker.pid, time.monotonic()
                return
            self._stop.wait(POLL_S)


def signal_after(pid: int, delay: float, signum: int) -> dict:
    """Sends `signum` to `pid` after `delay` seconds, from another thread; the returned dict gets "sent_at"."""
    sent: dict = {}

    def send() -> None:
        os.kill(pid, signum)
        sent["sent_at"] = time.monotonic()

    threading.Timer(delay, send).start()
    return sent


FAULTY_WORKER_MODULE = "reliability.faulty_vllm_worker"


class FaultyVllmEngine(VllmEngine):
    """VllmEngine on reliability/faulty_vllm_worker.py: the real worker and vLLM, with `fault` planted (see there).

    Registered as an engine in a test, it is a side of an EnginePool like vllm. The worker is imported from this
    repository: the test puts the repository's root on PYTHONPATH (rlparity's own folder stays first)."""

    def __init__(self, checkpoint, *, fault: str, **options):
        self.fault = fault
        super().__init__(checkpoint, **options)

    def _launch(self, python, start_timeout, log_path):
        python = python or find_vllm_python()[0]
        return launch_worker("vllm", python, FAULTY_WORKER_MODULE, {**self.options, "fault": self.fault},
                             start_timeout, log_path)
