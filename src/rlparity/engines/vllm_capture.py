"""Per-layer activations and routed experts, recorded inside the vLLM engine process.

Runs where vLLM's model lives (the engine process, with vLLM's in-process engine core), through
PyTorch forward hooks on vLLM's GPT-OSS modules and the router's own `set_capture_fn` callback. Names
follow rlparity.engines.base.capture_points:

    embed                      GptOssModel.embedding output, the residual stream entering layer 0
    layers.{i}.attn            OAIAttention output (after o_proj, before the residual add)
    layers.{i}.mlp             MLPBlock output (experts combined, before the residual add)
    layers.{i}                 the residual stream leaving layer i: vLLM's TransformerBlock returns it
                               unsummed as (mlp, residual), since the add is fused into the next
                               RMSNorm; it is summed here in float32
    norm                       GptOssModel.norm output, what the LM head reads
    layers.{i}.router_logits   MLPBlock.router (GateLinear) output, [tokens, experts]
    layers.{i}.expert_ids      the expert ids vLLM's router selected (BaseRouter capture callback, the
                               same ids `enable_return_routed_experts` records), ordered by router logit

Hooks record only between `start()` and `stop()`; every tensor is copied to float32 on the CPU when
its hook fires, because vLLM's fused add-RMSNorm later overwrites its inputs in place.
"""

import torch

LAYER_NAMES = ("attn", "mlp", "", "router_logits", "expert_ids")  # "" is the residual stream, named layers.{i}


def layer_name(index: int, what: str) -> str:
    return f"layers.{index}.{what}" if what else f"layers.{index}"


class CaptureUnavailable(RuntimeError):
    """The loaded model does not have the modules capture hooks onto; the message names what is missing."""


def _moe_runners(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    return {module.layer_id: module for module in model.modules() if isinstance(module, MoERunner)}


def _describe(module: torch.nn.Module) -> str:
    return f"{type(module).__name__} with children {[name for name, _ in module.named_children()]}"


class ActivationCapture:
    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(inner, "embedding") or not hasattr(inner, "norm"):
            raise CaptureUnavailable(f"expected vLLM's GptOssForCausalLM (model.embedding, model.layers, model.norm), "
                                     f"got {_describe(model)}")
        for index, layer in enumerate(layers):
            missing = [name for name in ("attn", "mlp") if not hasattr(layer, name)]
            if missing or not hasattr(layer.mlp, "router"):
                raise CaptureUnavailable(f"layer {index}: expected a TransformerBlock with attn and mlp.router, "
                                         f"got {_describe(layer)}")
        runners = _moe_runners(model)
        if sorted(runners) != list(range(len(layers))):
            raise CaptureUnavailable(f"expected one MoE runner per layer (0..{len(layers) - 1}), found layer ids "
                                     f"{sorted(runners)}")
        for index, runner in runners.items():
            if runner._quant_method.is_monolithic or not hasattr(runner.router, "set_capture_fn"):
                raise CaptureUnavailable(
                    f"layer {index}: the MoE kernel {type(runner._quant_method).__name__} routes inside a monolithic "
                    f"kernel (router {type(runner.router).__name__}); its expert ids cannot be observed")

        self.num_layers = len(layers)
        self.active = False
        self.records: dict[str, list[torch.Tensor]] = {}
        self._handles = [inner.embedding.register_forward_hook(self._hook("embed")),
                         inner.norm.register_forward_hook(self._hook("norm"))]
        for index, layer in enumerate(layers):
            self._handles += [
                layer.attn.register_forward_hook(self._hook(layer_name(index, "attn"))),
                layer.mlp.register_forward_hook(self._hook(layer_name(index, "mlp"))),
                layer.register_forward_hook(self._hook(layer_name(index, ""), unsummed_residual=True)),
                layer.mlp.router.register_forward_hook(self._hook(layer_name(index, "router_logits"))),
            ]
        for index, runner in runners.items():
            runner.router.set_capture_fn(self._expert_ids_callback(index, runner.router.capture_fn))

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        self.records.setdefault(name, []).append(tensor.detach().to(device="cpu", dtype=torch.float32, copy=True))

    def _hook(self, name: str, unsummed_residual: bool = False):
        def hook(module, inputs, output):
            if not self.active:
                return
            if unsummed_residual:
                mlp, residual = output  # TransformerBlock -> (mlp output, residual before the mlp)
                self._record(name, mlp.float() + residual.float())
                return
            # RMSNorm called with a residual returns (normed, residual sum).
            self._record(name, output[0] if isinstance(output, tuple) else output)
        return hook

    def _expert_ids_callback(self, index: int, previous):
        def capture(topk_ids: torch.Tensor) -> None:
            if previous is not None:  # vLLM's own routed-experts capturer, when it is enabled
                previous(topk_ids)
            if self.active:
                self.records.setdefault(layer_name(index, "expert_ids"), []).append(
                    topk_ids.detach().to(device="cpu", dtype=torch.int64, copy=True))
        return capture

    def start(self) -> None:
        self.records = {}
        self.active = True

    def stop(self, num_tokens: int) -> dict[str, "torch.Tensor"]:
        """Everything recorded since start(), each [num_tokens, ...]; raises if a forward pass covered other tokens."""
        self.active = False
        captured = {name: torch.cat(chunks) for name, chunks in self.records.items()}
        self.records = {}
        expected = {"embed", "norm"} | {layer_name(i, what) for i in range(self.num_layers) for what in LAYER_NAMES}
        if missing := sorted(expected - set(captured)):
            raise RuntimeError(f"capture saw no forward pass for {missing}; expected one prefill of "
                               f"{num_tokens} tokens")
        if wrong := {name: tuple(t.shape) for name, t in captured.items() if t.shape[0] != num_tokens}:
            raise RuntimeError(f"capture expected {num_tokens} token rows per tensor (one prefill, no prefix-cache "
                               f"hit), got {wrong}")
        for index in range(self.num_layers):
            ids, logits = captured[layer_name(index, "expert_ids")], captured[layer_name(index, "router_logits")]
            # vLLM's CPU router takes torch.topk(sorted=False): order the chosen ids by their logit, best first.
            order = torch.argsort(torch.gather(logits, 1, ids), dim=1, descending=True, stable=True)
            captured[layer_name(index, "expert_ids")] = torch.gather(ids, 1, order)
        return captured
