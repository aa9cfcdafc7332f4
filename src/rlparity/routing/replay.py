"""Router replay: run the trainer's forward with routes recorded elsewhere (the rollout engine's).

    with RouterReplay(model, routes, lengths):      # routes: one Routing per sequence of the batch
        logits = model(input_ids=ids, attention_mask=mask).logits

Inside the block each layer's router still computes its logits, but hands the experts the recorded ids,
with routing weights = softmax over the recorded experts' logits, so the router's parameters keep their
gradient through the weights. Given `weights` (the engine's routing weights, one [S, k] per layer and sequence,
in the order of the recorded ids), the experts get those instead: constants, so the router gets no gradient.
Padded positions (past a sequence's length) keep the router's own choice.

A replay that does not take effect must not pass for one: the routes are checked against the model
when the block opens (layers, tokens, k, expert ids), every router call checks the batch it sees, and
when the block closes every layer's experts must have been called, each time with exactly the recorded
ids; otherwise RlparityError says which layer did what. Under activation checkpointing, backward recomputes
the routers' forward: it must run inside the block (backward_inside=True), where it is checked too.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.routing.forward import Pass, run_pass
from rlparity.routing.layers import RouterLayer, experts_ids_argument, router_layers

UNFORCED = -1  # marks padded positions, where the router's own top-k is kept


@dataclass
class LayerReplay:
    """What happened in one layer while the replay was on."""

    router_calls: int = 0
    experts_calls: int = 0
    forced_tokens: int = 0  # tokens checked to have run the recorded ids, over all calls
    mismatches: int = 0  # tokens whose experts ran other ids than the recorded ones
    first_mismatch: str = ""


def check_routes(routes: Sequence[Routing], lengths: Sequence[int], layers: list[RouterLayer]) -> None:
    """Refuses routes that do not fit the batch and the model, naming expected vs received."""
    if not lengths:
        raise RlparityError("router replay: the batch has no sequences")
    if len(routes) != len(lengths):
        raise RlparityError(f"router replay: {len(routes)} recorded routes for a batch of {len(lengths)} sequences; "
                            f"expected one Routing per sequence")
    for i, (routing, length) in enumerate(zip(routes, lengths)):
        if len(routing.expert_ids) != len(layers):
            raise RlparityError(f"router replay: sequence {i} has routes for {len(routing.expert_ids)} layers, the "
                                f"model has {len(layers)}")
        for layer, ids in zip(layers, routing.expert_ids):
            where = f"router replay: sequence {i}, layer {layer.index}"
            if ids.dim() != 2 or ids.shape[0] != length:
                raise RlparityError(f"{where}: recorded expert ids of shape {tuple(ids.shape)}, expected "
                                    f"[{length} tokens, {layer.top_k}] (the sequence has {length} tokens)")
            if ids.shape[1] != layer.top_k:
                raise RlparityError(f"{where}: recorded {ids.shape[1]} experts per token, the model routes each "
                                    f"token to top_k = {layer.top_k}")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
                raise RlparityError(f"{where}: expert ids must be integers, got {ids.dtype}")
            if ids.numel() and (ids.min() < 0 or ids.max() >= layer.num_experts):
                bad = ids.min() if ids.min() < 0 else ids.max()
                raise RlparityError(f"{where}: expert id {int(bad)} is outside [0, {layer.num_experts}) (the model "
                                    f"has {layer.num_experts} experts)")
            repeated = (ids.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1)
            if repeated.any():
                t = int(repeated.nonzero()[0])
                raise RlparityError(f"{where}: token {t} is routed to expert(s) {ids[t].tolist()}; expected "
                                    f"{layer.top_k} distinct experts")


def forced_ids(routes: Sequence[Routing], lengths: Sequence[int], padded_len: int, layer: int,
               top_k: int) -> torch.Tensor:
    """[B * padded_len, k] in the MLP's flattened token order, UNFORCED at padded positions."""
    out = torch.full((len(lengths), padded_len, top_k), UNFORCED, dtype=torch.long)
    for row, (routing, length) in enumerate(zip(routes, lengths)):
        out[row, :length] = routing.expert_ids[layer].long().cpu()
    return out.reshape(-1, top_k)


def forced_weights(weights: Sequence[Sequence[torch.Tensor]], lengths: Sequence[int], padded_len: int, layer: int,
                   top_k: int) -> torch.Tensor:
    """weights[i][layer] [S_i, k] -> [B * padded_len, k] float32 in the MLP's token order (0 at padded positions)."""
    out = torch.zeros(len(lengths), padded_len, top_k, dtype=torch.float32)
    for row, (per_layer, length) in enumerate(zip(weights, lengths)):
        if tuple(per_layer[layer].shape) != (length, top_k):
            raise RlparityError(f"router replay: sequence {row}, layer {layer}: routing weights of shape "
                                f"{tuple(per_layer[layer].shape)}, expected [{length} tokens, {top_k}]")
        out[row, :length] = per_layer[layer].detach().float().cpu()
    return out.reshape(-1, top_k)


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """transformers' own test (PreTrainedModel.is_activation_checkpointing), without its deprecation path."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


class RouterReplay:
    def __init__(self, model: torch.nn.Module, routes: Sequence[Routing], lengths: Sequence[int],
                 padded_len: int | None = None, backward_inside: bool = False,
                 weights: Sequence[Sequence[torch.Tensor]] | None = None):
        """routes[i] for the i-th sequence of a right-padded batch; lengths[i] its tokens; padded_len the
        batch's sequence dimension (default: the longest). backward_inside: the caller runs backward inside the
        block, which activation checkpointing needs (its backward recomputes the routers' forward). weights[i]:
        the i-th sequence's routing weights per layer, to replay with the ids (default: the router's own)."""
        self.layers = router_layers(model)
        self.checkpointing = activation_checkpointing(model)
        self.backward_inside = backward_inside
        check_routes(routes, lengths, self.layers)
        self.padded_len = max(lengths) if padded_len is None else padded_len
        if self.padded_len < max(lengths):
            raise RlparityError(f"router replay: padded length {self.padded_len} is shorter than the longest "
                                f"sequence ({max(lengths)} tokens)")
        self.forced = [forced_ids(routes, lengths, self.padded_len, layer.index, layer.top_k) for layer in self.layers]
        if weights is not None and len(weights) != len(lengths):
            raise RlparityError(f"router replay: routing weights for {len(weights)} sequences, the batch has "
                                f"{len(lengths)}")
        self.weights = None if weights is None else [
            forced_weights(weights, lengths, self.padded_len, layer.index, layer.top_k) for layer in self.layers]
        self.report = [LayerReplay() for _ in self.layers]
        self._handles, self._saved = [], []

    def __enter__(self) -> "RouterReplay":
        self.report = [LayerReplay() for _ in self.layers]
        for layer in self.layers:
            self._saved.append((layer.router, layer.router.__dict__.get("forward")))
            layer.router.forward = self._router_forward(layer, layer.router.forward)
            self._handles.append(layer.experts.register_forward_pre_hook(self._verify(layer), with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for handle in self._handles:
            handle.remove()
        for router, previous in self._saved:
            if previous is None:
                del router.forward
            else:
                router.forward = previous
        self._handles, self._saved = [], []
        if exc_type is None:
            self.require_effect()

    def _router_forward(self, layer: RouterLayer, original):
        forced = self.forced[layer.index]
        recorded_weights = None if self.weights is None else self.weights[layer.index]
        state = self.report[layer.index]

        def forward(hidden_states):
            if hidden_states.shape[0] != forced.shape[0]:
                raise RlparityError(f"router replay: layer {layer.index}'s router received {hidden_states.shape[0]} "
                                    f"token rows, the recorded routes are for {forced.shape[0] // self.padded_len} "
                                    f"sequences x {self.padded_len} positions = {forced.shape[0]}")
            if self.checkpointing and torch.is_grad_enabled() and not self.backward_inside:
                raise RlparityError(
                    "router replay: activation checkpointing is on, so backward recomputes each layer's forward; "
                    "after this block the router is restored and the recomputed routes would be the model's own. "
                    "Run backward inside the block and pass backward_inside=True, or disable checkpointing")
            logits, _, own_ids = original(hidden_states)
            target = forced.to(own_ids.device)
            ids = torch.where(target == UNFORCED, own_ids, target)
            chosen = logits.gather(1, ids)
            weights = torch.softmax(chosen, dim=1, dtype=chosen.dtype)
            if recorded_weights is not None:
                weights = torch.where(target == UNFORCED, weights, recorded_weights.to(weights.device, weights.dtype))
            state.router_calls += 1
            return logits, weights, ids

        return forward

    def _verify(self, layer: RouterLayer):
        forced = self.forced[layer.index]
        state = self.report[layer.index]

        def check(module, args, kwargs):
            ids = experts_ids_argument(args, kwargs)
            state.experts_calls += 1
            real = forced != UNFORCED
            if ids.shape != forced.shape:
                state.mismatches += int(real.all(dim=-1).sum())
                state.first_mismatch = state.first_mismatch or (
                    f"the experts ran ids of shape {tuple(ids.shape)}, recorded {tuple(forced.shape)}")
                return
            wrong = (ids.cpu() != forced) & real
            state.forced_tokens += int(real.all(dim=-1).sum())
            if wrong.any():
                t = int(wrong.any(dim=-1).nonzero()[0])
                state.mismatches += int(wrong.any(dim=-1).sum())
                state.first_mismatch = state.first_mismatch or (
                    f"token row {t}: recorded {forced[t].tolist()}, ran {ids[t].tolist()}")

        return check

    def require_effect(self) -> None:
        """Raises unless every layer's experts ran, each time with the recorded ids, through the replay."""
        problems = []
        for layer, state in zip(self.layers, self.report):
            if state.experts_calls == 0:
                problems.append(f"layer {layer.index}: its experts never ran")
            elif state.router_calls == 0:
                problems.append(f"layer {layer.index}: its experts ran {state.experts_calls} time(s) but the router "
                                f"was never called (a fused MoE path that routes on its own?)")
            elif state.mismatches:
                problems.append(f"layer {layer.index}: {state.mismatches} tokens ran other experts than the recorded "
                                f"ones ({state.first_mismatch})")
        if problems:
            raise RlparityError("router replay did not take effect: " + "; ".join(problems))


def replayed_pass(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int,
                  routes: Sequence[Routing], *, train: bool, grad: bool, replay=RouterReplay, **options) -> Pass:
    """run_pass with the recorded routes forced; `replay` is the context manager that forces them, `options` go to
    it (RouterReplay's weights)."""
    with replay(model, routes, [len(sequence) for sequence in token_ids], **options):
        return run_pass(model, token_ids, pad_id, train=train, grad=grad)


def forced_mismatches(ran: Sequence[Routing], forced: Sequence[Routing]) -> int:
    """(token, layer) pairs whose experts ran other ids, or the same ids in another slot order, than forced."""
    return sum(int((r.cpu() != f.long().cpu()).any(dim=-1).sum())
               for got, want in zip(ran, forced) for r, f in zip(got.expert_ids, want.expert_ids))


def router_gradient_norms(model: torch.nn.Module, loss: torch.Tensor) -> list[float]:
    """|grad| (weight and bias together) of each layer's router after loss.backward(); 0 where none arrived."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    norms = []
    for layer in router_layers(model):
        grads = [p.grad for p in (layer.router.weight, layer.router.bias) if p.grad is not None]
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0)
    model.zero_grad(set_to_none=True)
    return norms
