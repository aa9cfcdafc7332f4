"""The SGLang engine process: one model in SGLang's offline Engine, serving requests (rlparity.engines.sglang).

    python -m rlparity.engines.sglang_worker --response-fd FD --options JSON

Runs under the interpreter that has SGLang, where rlparity need not be installed: the parent puts its own
source folder on PYTHONPATH. Requests arrive one JSON object per line on stdin; each answer is one line on the
response fd; the first line describes the loaded engine or the error that prevented loading it. SGLang starts
its scheduler and detokenizer as child processes; they share this process's session, so the parent stops them
together with it.

Only the standard library, numpy (through wire) and, once serving, torch and sglang are imported: the parsing
of SGLang's output (`input_logprobs`) is importable and tested without either.
"""

import argparse
import json
import os
import sys

from rlparity.engines import wire

# Every request prefills every token (no prefix reuse), SGLang does not tokenize (ids in, ids out), and no CUDA
# graphs are captured: the engine runs one prefill and one decode step per request.
FIXED_ENGINE_ARGS = {"disable_radix_cache": True, "skip_tokenizer_init": True, "disable_cuda_graph": True,
                     "log_level": "error"}
# One new token: SGLang always samples at least one; with logprob_start_len=0 the prompt's log-probs come back in
# meta_info["input_token_logprobs"].
PROMPT_LOGPROBS_PARAMS = {"max_new_tokens": 1, "temperature": 0.0}


def engine_args(options: dict) -> dict:
    args = {"model_path": options["checkpoint"], "dtype": options["dtype"], "random_seed": options["seed"],
            "context_length": options["context_length"], "mem_fraction_static": options["mem_fraction_static"],
            **FIXED_ENGINE_ARGS}
    if options.get("tokenizer"):
        args["tokenizer_path"] = options["tokenizer"]
    if options.get("attention_backend"):
        args["attention_backend"] = options["attention_backend"]
    if options.get("model_overrides"):
        args["json_model_override_args"] = json.dumps(options["model_overrides"])
    return args


def input_logprobs(entries: list, token_ids: list[int]) -> list[float]:
    """SGLang's meta_info["input_token_logprobs"] for logprob_start_len=0 -> log p(ids[t] | ids[:t]) for t >= 1.

    SGLang returns one (logprob, token_id, text) per input token, the first logprob None (no context). Anything
    else (another length, a token id that is not the input's, a missing value) is an alignment error, named.
    """
    if len(entries) != len(token_ids):
        raise ValueError(f"SGLang returned {len(entries)} input-token log-probs for {len(token_ids)} input tokens "
                         f"(expected one per token, the first None, for logprob_start_len=0)")
    first = entries[0][0]
    if first is not None:
        raise ValueError(f"SGLang's first input-token log-prob is {first!r}, expected None (the first token has no "
                         f"context); the values may be shifted by one position")
    values = []
    for position, (entry, expected) in enumerate(zip(entries[1:], token_ids[1:]), start=1):
        logprob, token = entry[0], entry[1]
        if token != expected:
            raise ValueError(f"SGLang's input-token log-prob {position} is for token id {token}, the input has "
                             f"{expected} there; the values are not aligned with the input")
        if logprob is None:
            raise ValueError(f"SGLang returned no log-prob for input token {position} (id {token})")
        values.append(float(logprob))
    return values


class Server:
    def __init__(self, options: dict):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("SGLang needs a CUDA GPU; none is visible to the engine process "
                               f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        import sglang

        self.sglang = sglang
        self.args = engine_args(options)
        self.engine = sglang.Engine(**self.args)
        # A model SGLang loads but cannot run fails here, as a start failure rather than the first request's.
        self.prompt_logprobs([[0, 1]])

    def info(self) -> dict:
        import torch
        import transformers

        server_args = self.engine.server_args
        chosen = ("attention_backend", "prefill_attention_backend", "decode_attention_backend", "dtype",
                  "context_length", "disable_radix_cache", "random_seed", "moe_runner_backend", "sampling_backend")
        return {
            "versions": {"sglang": getattr(self.sglang, "__version__", "unknown"), "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": sys.version.split()[0]},
            "device": torch.cuda.get_device_name(),
            "server_args": {name: _plain(getattr(server_args, name, None)) for name in chosen},
            "engine_args": {key: value for key, value in self.args.items() if key != "model_path"},
            "pid": os.getpid(),
        }

    def prompt_logprobs(self, sequences: list[list[int]]) -> dict:
        """Per sequence, log p(ids[t] | ids[:t]) for t >= 1, from SGLang's input_token_logprobs; one call for all."""
        outputs = self.engine.generate(input_ids=sequences, sampling_params=dict(PROMPT_LOGPROBS_PARAMS),
                                       return_logprob=True, logprob_start_len=0)
        if isinstance(outputs, dict):  # SGLang answers a flat input_ids with one dict, a list of lists with a list
            outputs = [outputs]
        if len(outputs) != len(sequences):
            raise ValueError(f"SGLang answered {len(outputs)} of {len(sequences)} requests")
        return {"logprobs": [input_logprobs(output["meta_info"]["input_token_logprobs"], ids)
                             for output, ids in zip(outputs, sequences)]}

    def shutdown(self) -> None:
        self.engine.shutdown()


def _plain(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def serve(server: Server, requests, respond) -> None:
    handlers = {
        "info": lambda request: server.info(),
        "prompt_logprobs": lambda request: server.prompt_logprobs(request["token_ids"]),
    }
    if not wire.serve_requests(requests, respond, handlers, on_shutdown=server.shutdown):
        server.shutdown()  # stdin closed: the parent is gone


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--response-fd", type=int, required=True)
    parser.add_argument("--options", required=True, help="JSON object of engine options (see SglangEngine)")
    args = parser.parse_args(argv)
    return wire.run_worker(args.response_fd, lambda: Server(json.loads(args.options)), serve, sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
