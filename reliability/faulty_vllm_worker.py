"""rlparity's vLLM worker (rlparity.engines.vllm_worker, serving real vLLM) with one fault planted, for
reliability/test_engine_faults.py; run as `python -m reliability.faulty_vllm_worker` by faults.FaultyVllmEngine.

The fault comes in the engine options under "fault" (removed before the real worker reads them):

    exit_before_start:N   the process prints a line and exits with status N before its first message
    garbage               the answer to request 1 is replaced by bytes that are not JSON
    truncated             the answer to request 1 is cut after half its bytes (the line still ends)
    wrong_id              the answer to request 1 carries request 101's id

It runs under the engine's interpreter, which has only the standard library, numpy, vLLM and rlparity's worker code.
"""

import json
import os
import sys

CORRUPTED_REQUEST = 1


def corrupt(line: bytes, message: dict, kind: str, dumps) -> bytes:
    if message.get("id") != CORRUPTED_REQUEST:
        return line
    if kind == "garbage":
        return b"\x00\xff this is not JSON \x80\n"
    if kind == "truncated":
        return line[: len(line) // 2] + b"\n"
    if kind == "wrong_id":
        return dumps({**message, "id": CORRUPTED_REQUEST + 100})
    raise ValueError(f"unknown fault {kind!r}")


def main() -> None:
    argv = sys.argv[1:]
    at = argv.index("--options") + 1
    options = json.loads(argv[at])
    kind, _, value = options.pop("fault").partition(":")
    argv[at] = json.dumps(options)
    if kind == "exit_before_start":
        print(f"faulty worker: exiting with status {value} before the first message", flush=True)
        os._exit(int(value))
    from rlparity.engines import vllm_worker, wire

    dumps = wire.dumps
    wire.dumps = lambda message: corrupt(dumps(message), message, kind, dumps)  # what run_worker answers with
    vllm_worker.exit_now(vllm_worker.main(argv))


if __name__ == "__main__":
    main()
