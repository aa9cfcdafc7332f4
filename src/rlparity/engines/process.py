"""Host an engine in its own process: start it once, send it requests, notice when it dies or hangs.

The engine process reads one request per line on its stdin and answers one line per request on a
separate pipe (its stdout and stderr go to a log file, because engines print freely there). Every
error raised here names the engine, the process id and the request, and ends with the tail of the log.

    with EngineProcess("vllm", argv, env=env) as engine:
        info = engine.start(timeout=300)
        result = engine.request("prompt_logprobs", token_ids=[...], timeout=60)
"""

import getpass
import importlib.util
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from rlparity.engines import wire


def find_engine_python(env_var: str, module: str, engine: str, install_hint: str) -> tuple[str | None, str]:
    """The interpreter an engine process runs with: $env_var, else this one if it can import `module`.

    Returns (interpreter, how it was chosen), or (None, why there is none and what to do).
    """
    named = os.environ.get(env_var)
    if named:
        path = shutil.which(named) or named
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return None, (f"{env_var}={named!r} is not an executable file; point it at the python of an "
                          f"environment with {engine}")
        return path, f"{env_var}={named}"
    if importlib.util.find_spec(module) is not None:
        return sys.executable, f"this interpreter ({sys.executable}) has {module}"
    return None, f"{engine} is not importable here ({sys.executable}) and {env_var} is not set; {install_hint}"


# Package versions of an interpreter, read from its installed metadata (no package is imported, so it is quick).
_VERSIONS_SCRIPT = """
import json, platform, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({"python": platform.python_version(), **{name: version(name) for name in sys.argv[1:]}}))
"""
VERSIONS_TIMEOUT_S = 60.0


def interpreter_versions(python: str, packages: tuple[str, ...]) -> dict:
    """{"python": ..., package: version or None} of another interpreter, or {"error": why it could not be read}."""
    import json

    try:
        done = subprocess.run([python, "-c", _VERSIONS_SCRIPT, *packages], capture_output=True, text=True,
                              timeout=VERSIONS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    return json.loads(done.stdout)


LOG_TAIL_LINES = 40
CLOSE_TIMEOUT_S = 30.0
# After the answer pipe closes, how long the process gets to end by itself so that its exit status can be named
# (a dying process closes the pipe microseconds before the kernel reports it gone); then it is stopped.
EXIT_GRACE_S = 2.0
MALFORMED_BYTES_SHOWN = 200  # of a malformed answer, in the error


def inductor_cache_dir() -> str:
    """Torch inductor's default cache folder, as torch._inductor.runtime.cache_dir_utils.default_cache_dir names it:
    in the temp folder, named after the user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


class EngineProcessError(RuntimeError):
    """The engine process could not start, died, hung, or failed a request; the message carries its log tail."""


class EngineProcess:
    def __init__(self, name: str, argv: list[str], *, env: dict | None = None, log_path: str | Path | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.keep_log = log_path is not None
        # The process runs in an empty folder of its own: `python -m` puts the working directory first on
        # sys.path, where a file named like a package (this repository's engines/vllm.py) would shadow it.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"rlparity-{name}-"))
        self.log_path = Path(log_path) if log_path is not None else self.workdir / "engine.log"
        self._process: subprocess.Popen | None = None
        self._responses: int | None = None  # read end of the response pipe
        self._buffer = b""
        self._next_id = 0

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._exit_status() is None

    def _exit_status(self) -> int | None:
        """The process's exit status as Popen.returncode gives it (-N: killed by signal N), None while it runs.

        Read without reaping the process: until _stop reaps it, its process group keeps its id, so the group
        (the engine and anything it spawned) can still be killed as a whole, and no other process can have that id.
        """
        if self._process.returncode is not None:
            return self._process.returncode
        try:
            exited = os.waitid(os.P_PID, self._process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already (by Popen)
            return self._process.poll()
        if exited is None:
            return None
        return exited.si_status if exited.si_code == os.CLD_EXITED else -exited.si_status

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as log:
                tail = deque(log, maxlen=lines)
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        return b"".join(tail).decode("utf-8", errors="replace").rstrip() or "(the log is empty)"

    def _error(self, what: str) -> EngineProcessError:
        self.keep_log = True
        return EngineProcessError(
            f"{self.name} engine (pid {self.pid}): {what}\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def start(self, timeout: float) -> dict:
        """Launches the process and waits for its first message, which describes the loaded engine."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} engine already started (pid {self.pid})")
        # The engine's temporary files go into its own folder, removed with it: vLLM leaves a rendezvous file
        # (vllm_dist_<uuid>) in the system's temp folder at every start, killed or closed cleanly. Torch's compile
        # cache, also in the temp folder, stays shared through a link: vLLM on CPU compiles a 150 MB precompiled
        # header into it (7 s) once, not at every start (its folder ignores TORCHINDUCTOR_CACHE_DIR).
        shared_cache = Path(inductor_cache_dir())
        shared_cache.mkdir(parents=True, exist_ok=True)
        (self.workdir / shared_cache.name).symlink_to(shared_cache, target_is_directory=True)
        env = {**(os.environ if self.env is None else self.env), "TMPDIR": str(self.workdir)}
        read_end, write_end = os.pipe()
        log = open(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(
                [*self.argv, "--response-fd", str(write_end)], stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT, pass_fds=(write_end,), env=env, cwd=self.workdir,
                # Its own process group: a hung engine and anything it spawned are stopped together.
                start_new_session=True,
            )
        finally:
            log.close()
            os.close(write_end)
        self._responses = read_end
        started = time.monotonic()
        reply = self._read(0, timeout, "start")
        if not reply["ok"]:
            self._stop()
            raise self._error(f"failed to start: {reply['error']}")
        return {**reply["result"], "start_seconds": time.monotonic() - started}

    def request(self, op: str, timeout: float, **fields) -> dict:
        if not self.running:
            what = self._exit_description(f"cannot serve {op!r}")
            self._stop()  # what is left of its process group
            raise self._error(what)
        self._next_id += 1
        request_id = self._next_id
        try:
            self._process.stdin.write(wire.dumps({"id": request_id, "op": op, **fields}))
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            what = self._exit_description(f"died before {op!r} was sent ({exc})")
            self._stop()
            raise self._error(what) from None
        reply = self._read(request_id, timeout, op)
        if not reply["ok"]:
            raise self._error(f"request {op!r} failed in the engine: {reply['error']}")
        return reply["result"]

    def _exit_description(self, what: str) -> str:
        code = self._exit_status() if self._process is not None else None
        if code is None:
            return what
        how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{what}: the process {how}"

    def _read(self, request_id: int, timeout: float, op: str) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stop()
                raise self._error(f"no answer to {op!r} within {timeout:.0f} s; the process was stopped")
            ready, _, _ = select.select([self._responses], [], [], min(remaining, 1.0))
            if not ready:
                if self._exit_status() is not None:
                    raise self._died(op)
                continue
            chunk = os.read(self._responses, 1 << 20)
            if not chunk:
                raise self._died(op)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = wire.loads(line)
            reply["result" if reply["ok"] else "error"]  # the fields every answer has
        except (ValueError, KeyError, TypeError) as exc:  # json, base64 and numpy refuse bad data with ValueError
            self._stop()
            raise self._error(f"sent a malformed answer to request {request_id} ({op!r}): {type(exc).__name__}: "
                              f"{exc}; the answer's first bytes (of {len(line) + 1}) were "
                              f"{line[:MALFORMED_BYTES_SHOWN]!r}; the process was stopped") from None
        if reply.get("id") != request_id:
            self._stop()
            raise self._error(f"answered request {reply.get('id')!r} while {request_id} ({op!r}) was expected; "
                              "the process was stopped")
        return reply

    def _died(self, op: str) -> EngineProcessError:
        """The answer pipe closed or the process ended: waits briefly for its exit status, then stops what is left
        of its process group."""
        waited = time.monotonic() + EXIT_GRACE_S
        while self._exit_status() is None and time.monotonic() < waited:
            time.sleep(0.05)
        what = self._exit_description(f"died while serving {op!r}")
        if self._exit_status() is None:
            what += " (it closed its answer pipe and was stopped)"
        if self._buffer:
            what += (f"; it had sent {len(self._buffer)} bytes of an unfinished answer: "
                     f"{self._buffer[:MALFORMED_BYTES_SHOWN]!r}")
        self._stop()
        return self._error(what)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Asks the engine to shut down, then stops it if it does not. Its folder goes, with the log in it unless an
        error was reported (a log_path given by the caller always stays)."""
        if self._process is None:
            return
        if self.running:
            try:
                self.request("shutdown", timeout=timeout)
                self._process.wait(timeout=timeout)
            except (EngineProcessError, subprocess.TimeoutExpired):
                pass
        self._stop()
        if not (self.keep_log and self.log_path.parent == self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop(self) -> None:
        """Kills the process group (the engine, alive or not yet reaped, and anything it spawned), then reaps it."""
        if self._process is not None and self._process.returncode is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)  # SIGKILL also ends a stopped (SIGSTOP) process
            except ProcessLookupError:
                pass
            self._process.wait(timeout=CLOSE_TIMEOUT_S)
        if self._process is not None and self._process.stdin is not None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
        if self._responses is not None:
            os.close(self._responses)
            self._responses = None

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _rlparity_only_path(package: Path) -> Path:
    """A folder holding only a link to `package` (this rlparity), for the worker's PYTHONPATH.

    Adding the folder rlparity is installed in would also put that environment's torch and transformers ahead of
    the engine environment's own (an installed wheel sits in site-packages beside them)."""
    import hashlib

    folder = Path(tempfile.gettempdir()) / f"rlparity-path-{hashlib.sha256(str(package).encode()).hexdigest()[:16]}"
    link = folder / "rlparity"
    if not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(package, target_is_directory=True)
        except FileExistsError:  # another process made it first
            pass
    return folder


def launch_worker(engine: str, python: str, module: str, options: dict, start_timeout: float,
                  log_path=None) -> tuple["EngineProcess", dict]:
    """Start `python -m module --options JSON` as an engine process; (process, the worker's info) once ready.

    The worker's interpreter imports this checkout's rlparity (wire format, worker code), installed there or not.
    """
    import json

    import rlparity

    env = dict(os.environ)
    package_root = str(_rlparity_only_path(Path(rlparity.__file__).resolve().parent))
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    argv = [python, "-m", module, "--options", json.dumps(options)]
    process = EngineProcess(engine, argv, env=env, log_path=log_path)
    try:
        return process, process.start(start_timeout)
    except BaseException:
        process.close()
        raise
