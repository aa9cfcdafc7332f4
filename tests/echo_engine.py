"""A minimal engine process for testing rlparity.engines.process: it speaks the same protocol as the vLLM
worker and misbehaves on request (hang, exit, fail to start), in milliseconds instead of vLLM's seconds.

    python tests/echo_engine.py --response-fd FD [--start fail|hang]
"""

import argparse
import os
import sys
import tempfile
import time

from rlparity.engines import wire
from rlparity.engines.process import inductor_cache_dir


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--response-fd", type=int, required=True)
    parser.add_argument("--start", choices=("ok", "fail", "hang"), default="ok")
    args = parser.parse_args()
    responses = os.fdopen(args.response_fd, "wb", buffering=0)
    print("echo engine: starting", flush=True)
    if args.start == "hang":
        time.sleep(3600)
    if args.start == "fail":
        print("echo engine: cannot load the model", flush=True)
        responses.write(wire.dumps({"id": 0, "ok": False, "error": "ValueError: planted start failure"}))
        return 1
    responses.write(wire.dumps({"id": 0, "ok": True, "result": {"pid": os.getpid()}}))
    for line in sys.stdin.buffer:
        request = wire.loads(line)
        print(f"echo engine: request {request['op']}", flush=True)
        if request["op"] == "sleep":
            time.sleep(request["seconds"])
        elif request["op"] == "exit":
            os._exit(request["code"])
        elif request["op"] == "fail":
            responses.write(wire.dumps({"id": request["id"], "ok": False, "error": "RuntimeError: planted failure"}))
            continue
        elif request["op"] == "temp_file":
            request["path"] = tempfile.mkstemp(prefix="echo-")[1]
            request["inductor_cache"] = os.path.realpath(inductor_cache_dir())
        elif request["op"] == "wrong_id":
            request["id"] += 100
        responses.write(wire.dumps({"id": request["id"], "ok": True, "result": request}))
        if request["op"] == "shutdown":
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
