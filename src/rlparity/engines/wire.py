"""The message format between rlparity and an engine running in another process: one JSON object per line.

numpy arrays travel as {"__array__": dtype, "shape": [...], "data": base64 of the C-order bytes}, so
floats arrive bit-exact and neither side unpickles anything from the other. Only the standard library
and numpy are imported here: the engine's interpreter may have nothing else of rlparity's dependencies.
"""

import base64
import json

import numpy as np

ARRAY_KEY = "__array__"


def _encode(value):
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {ARRAY_KEY: array.dtype.str, "shape": list(array.shape),
                "data": base64.b64encode(array.tobytes()).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        if ARRAY_KEY in value:
            data = base64.b64decode(value["data"])
            return np.frombuffer(data, dtype=np.dtype(value[ARRAY_KEY])).reshape(value["shape"]).copy()
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def dumps(message: dict) -> bytes:
    """One line, newline-terminated; floats keep full precision (json writes repr)."""
    return (json.dumps(_encode(message), allow_nan=True) + "\n").encode("utf-8")


def loads(line: bytes) -> dict:
    message = _decode(json.loads(line))
    if not isinstance(message, dict):
        raise ValueError(f"expected a JSON object per line, got {type(message).__name__}: {line[:200]!r}")
    return message


def serve_requests(requests, respond, handlers: dict, on_shutdown=lambda: None) -> bool:
    """The worker's loop: one JSON request a line, answered by handlers[op](request), until "shutdown" or EOF.

    A handler's exception is answered as an error (its traceback goes to the log) and the loop goes on.
    Returns True after a "shutdown" request (on_shutdown ran before the answer), False at end of input.
    """
    import traceback

    for line in requests:
        request = loads(line)
        op = request.get("op")
        if op == "shutdown":
            on_shutdown()
            respond({"id": request["id"], "ok": True, "result": {}})
            return True
        try:
            if op not in handlers:
                raise ValueError(f"unknown request {op!r}; expected one of {sorted(handlers) + ['shutdown']}")
            respond({"id": request["id"], "ok": True, "result": handlers[op](request)})
        except Exception as exc:
            traceback.print_exc()
            respond({"id": request["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return False


def run_worker(response_fd: int, make_server, serve, requests) -> int:
    """An engine worker's life: build the server, answer request 0 with its info (or the error), then serve.

    `serve(server, requests, respond)` answers the rest; answers go to `response_fd`, never inherited by
    processes the engine spawns. Returns the process exit status.
    """
    import os
    import traceback

    os.set_inheritable(response_fd, False)
    responses = os.fdopen(response_fd, "wb", buffering=0)

    def respond(message: dict) -> None:
        responses.write(dumps(message))

    try:
        server = make_server()
        info = server.info()
    except Exception as exc:
        traceback.print_exc()
        respond({"id": 0, "ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"})
        return 1
    respond({"id": 0, "ok": True, "result": info})
    serve(server, requests, respond)
    return 0
