"""Run a function on N processes joined by torch.distributed: from pytest, or under torchrun.

From Python (pytest fixtures, benchmarks), a `WorkerGroup` starts `world_size` worker processes once,
joins them into a process group (gloo on CPU, nccl on CUDA) and then runs any number of tasks:

    with WorkerGroup(4) as group:
        per_rank = group.run(module_level_function, *args)   # fn(*args) on every rank, results by rank

Workers fork from a forkserver that has imported torch once, so starting a group costs a fraction of
a second after the first. Failures never hang the caller: every collective has the process group's
timeout, and a rank that raises or dies ends `run` with a `RankFailedError` carrying that rank's
traceback; ranks still blocked in a collective with it are terminated after `FAILURE_GRACE_S`.

Under torchrun the same functions run unchanged after `init_from_env()`:

    torchrun --nproc-per-node 4 -m rlparity.parallel rlparity.parallel.check:smoke
"""

import faulthandler
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import connection

import torch
import torch.distributed as dist

from rlparity.errors import RlparityError

# A collective that waits longer than this raises in every rank that waits (gloo and nccl honour it).
COLLECTIVE_TIMEOUT_S = 60.0
# Backstop for one task on the caller's side, should a rank hang outside any collective.
TASK_TIMEOUT_S = 300.0
# Starting the workers: the first start imports torch in the forkserver (seconds on a loaded machine).
START_TIMEOUT_S = 120.0
# After one rank fails, how long the others get to report before they are taken to be stuck in a
# collective with the failed rank and terminated. Long enough for ranks that were about to finish.
FAILURE_GRACE_S = 2.0
# How often an idle worker checks that its parent is still alive (so orphans exit on their own).
PARENT_POLL_S = 1.0
_READY = "ready"


class RankFailedError(RlparityError):
    """A rank of a worker group raised, died, or did not finish in time."""

    def __init__(self, message: str, *, rank: int, kind: str, remote_traceback: str = ""):
        super().__init__(message)
        self.rank, self.kind, self.remote_traceback = rank, kind, remote_traceback


@dataclass
class _Failure:
    """What a worker sends back when its task raised (the exception itself may not pickle)."""

    type_name: str
    message: str
    traceback: str
    input_error: bool  # an RlparityError: raised before any unmatched collective, by design


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def rank_device() -> torch.device:
    """The device this rank computes on: its own GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout_s: float = COLLECTIVE_TIMEOUT_S, backend: str | None = None) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) with a timeout."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RlparityError(f"init_from_env: expected torchrun's environment, missing {', '.join(missing)}")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker(rank, world_size, backend, store_path, timeout_s, parent_pid, conn):
    faulthandler.register(signal.SIGUSR1)  # the parent asks for the stacks of a stuck rank this way
    try:
        torch.set_num_threads(_threads_per_rank(world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        conn.send((_READY, True, None))
    except BaseException as exc:  # reported to the parent, which names this rank
        conn.send((_READY, False, _Failure(type(exc).__name__, str(exc), traceback.format_exc(), False)))
        return
    while True:
        if not conn.poll(PARENT_POLL_S):
            if not _parent_alive(parent_pid):
                break
            continue
        task = conn.recv()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            reply = (task_id, True, fn(*args, **kwargs))
        except BaseException as exc:
            reply = (task_id, False, _Failure(type(exc).__name__, str(exc), traceback.format_exc(),
                                              isinstance(exc, RlparityError)))
        try:
            conn.send(reply)
        except Exception as exc:  # the result did not pickle
            conn.send((task_id, False, _Failure(type(exc).__name__, f"cannot send the result back: {exc}",
                                                traceback.format_exc(), False)))
    dist.destroy_process_group()


def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Takes effect when this process starts its forkserver; later calls are harmless.
    ctx.set_forkserver_preload(["torch", "torch.distributed", "rlparity.parallel"])
    return ctx


class WorkerGroup:
    """`world_size` processes in one process group, started once, running tasks until closed."""

    def __init__(self, world_size: int, *, backend: str | None = None,
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, task_timeout_s: float = TASK_TIMEOUT_S,
                 start_timeout_s: float = START_TIMEOUT_S):
        if world_size < 1:
            raise RlparityError(f"WorkerGroup: world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend or default_backend()
        if self.backend == "nccl" and torch.cuda.device_count() < world_size:
            raise RlparityError(f"WorkerGroup: nccl needs one GPU per rank: {world_size} ranks, "
                                f"{torch.cuda.device_count()} GPUs visible")
        self.collective_timeout_s = collective_timeout_s
        self.task_timeout_s = task_timeout_s
        self._processes, self._conns = [], []
        self._tasks_run = 0
        self._closed_because = None
        self._store_dir = tempfile.mkdtemp(prefix="rlparity-pg-")
        self._start(start_timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        return self._closed_because is None

    def _start(self, timeout_s):
        ctx = _context()
        store = os.path.join(self._store_dir, "store")
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(target=_worker, name=f"rlparity-rank{rank}", daemon=True,
                                  args=(rank, self.world_size, self.backend, store, self.collective_timeout_s,
                                        os.getpid(), child_end))
            process.start()
            child_end.close()
            self._processes.append(process)
            self._conns.append(parent_end)
        self._collect(_READY, timeout_s, what=f"joining a {self.backend} process group of {self.world_size}")

    def run(self, fn, *args, timeout_s: float | None = None, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; the values by rank. `fn` must be importable by name."""
        if not self.alive:
            raise RlparityError(f"WorkerGroup is closed: {self._closed_because}")
        self._tasks_run += 1
        task_id = self._tasks_run
        for conn in self._conns:
            try:
                conn.send((task_id, fn, args, kwargs))
            except (BrokenPipeError, OSError):
                pass  # that rank is gone; collecting the replies reports it with its exit code
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(task_id, timeout_s or self.task_timeout_s, what=name)

    def _collect(self, tag, timeout_s, *, what) -> list:
        values, failures, exits = {}, {}, {}
        failed_in_order = []  # the first is taken for the cause, the others for its consequences
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        first_failure_at = None
        while pending:
            until = deadline if first_failure_at is None else min(deadline, first_failure_at + FAILURE_GRACE_S)
            waitables = {self._conns[r]: r for r in pending} | {self._processes[r].sentinel: r for r in pending}
            ready = connection.wait(list(waitables), timeout=max(0.0, until - time.monotonic()))
            if not ready:
                break
            # A rank that died is the likelier cause of what its peers report at the same moment.
            for rank in sorted({waitables[h] for h in ready}, key=lambda r: self._processes[r].is_alive()):
                reply = self._receive(rank)
                if reply is None:
                    exits[rank] = self._processes[rank].exitcode
                else:
                    reply_tag, ok, value = reply
                    if reply_tag != tag:
                        continue  # a late reply to an earlier task cannot happen while the group is alive
                    (values if ok else failures)[rank] = value
                pending.discard(rank)
                if rank in failures or rank in exits:
                    failed_in_order.append(rank)
                    first_failure_at = first_failure_at or time.monotonic()
        if not failed_in_order and not pending:
            return [values[r] for r in range(self.world_size)]
        # A rank that died is the likelier cause even when a peer's error (its connection reset by the dead rank)
        # reached us first: on a loaded machine the exit is noticed a polling round later. Ranks die by a crash or
        # a kill, never as the consequence of a peer's Python exception.
        failed_in_order.sort(key=lambda rank: rank not in exits)
        # All ranks reporting input errors (each raised before an unmatched collective) leave the group usable.
        reusable = not exits and not pending and all(f.input_error for f in failures.values())
        error = self._failure_error(what, failed_in_order, failures, exits, pending, timeout_s)
        if not reusable:
            self.close(reason=str(error).splitlines()[0], dump_stacks=sorted(pending))
        raise error

    def _receive(self, rank):
        """The rank's reply, or None when the rank is gone (its pipe closed without one)."""
        conn, process = self._conns[rank], self._processes[rank]
        try:
            if conn.poll():
                return conn.recv()
        except (EOFError, OSError):
            pass
        process.join(timeout=1.0)  # the pipe closes as the process exits; let it finish for its exit code
        return None

    def _failure_error(self, what, failed_in_order, failures, exits, pending, timeout_s) -> RankFailedError:
        lines, trace = [], ""
        messages = {(f.type_name, f.message) for f in failures.values()}
        if len(failures) == self.world_size and len(messages) == 1:  # the same error everywhere, e.g. bad input
            rank, kind, failure = min(failures), "raised", failures[min(failures)]
            lines.append(f"all {self.world_size} ranks raised {failure.type_name} in {what}: {failure.message}")
            trace = failure.traceback
            failed_in_order = [rank]
        elif failed_in_order:
            rank = failed_in_order[0]
            if rank in failures:
                kind, failure = "raised", failures[rank]
                lines.append(f"rank {rank} of {self.world_size} raised {failure.type_name} in {what}: "
                             f"{failure.message}")
                trace = failure.traceback
            else:
                kind = "exited"
                lines.append(f"rank {rank} of {self.world_size} exited with code {exits[rank]} during {what} "
                             "(killed or crashed outside Python; its stderr has the details)")
        else:
            rank, kind = min(pending), "timed out"
            lines.append(f"rank {rank} of {self.world_size} did not finish {what} within {timeout_s:g} s; "
                         "its Python stack was dumped to stderr")
        for other in failed_in_order[1:]:
            if other in failures:
                first_line = (failures[other].message.splitlines() or [""])[0]
                lines.append(f"  rank {other} then raised {failures[other].type_name}: {first_line}")
            else:
                lines.append(f"  rank {other} then exited with code {exits[other]}")
        if pending and failed_in_order:
            ranks = ", ".join(str(r) for r in sorted(pending))
            lines.append(f"  rank(s) {ranks} still running {FAILURE_GRACE_S:g} s later (waiting in a collective "
                         "with the failed rank): terminated")
        if trace:
            lines.append(f"--- traceback of rank {rank} ---")
            lines.append(trace.rstrip())
        return RankFailedError("\n".join(lines), rank=rank, kind=kind, remote_traceback=trace)

    def close(self, reason: str = "closed by the caller", dump_stacks=()) -> None:
        if self._closed_because is not None:
            return
        self._closed_because = reason
        for rank in dump_stacks:
            if self._processes[rank].is_alive():
                os.kill(self._processes[rank].pid, signal.SIGUSR1)
        if dump_stacks:
            time.sleep(0.2)  # let faulthandler write before the process goes
        for conn, process in zip(self._conns, self._processes):
            if process.is_alive() and not dump_stacks:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for process in self._processes:
            process.join(timeout=5.0 if not dump_stacks else 0.0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=2.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._store_dir, ignore_errors=True)


def launch(fn, world_size: int, *args, **kwargs) -> list:
    """Start a group, run fn(*args, **kwargs) once on every rank, close the group; the values by rank."""
    with WorkerGroup(world_size) as group:
        return group.run(fn, *args, **kwargs)
