"""Router capture on a transformers GPT-OSS model: forward hooks on every layer's router and experts.

The expert ids recorded are the ones the experts module was called with (a forward pre-hook on
`mlp.experts`), not the router's output: if anything between the two changes the routes (a replay, a
patched MLP), capture reports what was computed. The logits are the router's own output. A batch is
[B, S] right-padded; the MLP flattens it to B*S token rows, which `sequences` splits back.
"""

from collections.abc import Sequence

import torch

from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.routing.layers import experts_ids_argument, router_layers


class RouterCapture:
    """Records (router logits [T, E], expert ids [T, k]) per layer for each forward pass run inside `with`."""

    def __init__(self, model: torch.nn.Module):
        self.layers = router_layers(model)
        self.logits: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.ids: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._handles = []

    def __enter__(self) -> "RouterCapture":
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._logits_hook(layer.index)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._ids_hook(layer.index), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _logits_hook(self, index: int):
        def record(module, args, output):
            self.logits[index].append(output[0].detach())
        return record

    def _ids_hook(self, index: int):
        def record(module, args, kwargs):
            self.ids[index].append(experts_ids_argument(args, kwargs).detach().clone())
        return record

    def sequences(self, lengths: Sequence[int], padded_len: int) -> list[Routing]:
        """The one captured forward pass, split into right-padded sequences of these lengths."""
        rows = len(lengths) * padded_len
        for layer in self.layers:
            calls = (len(self.logits[layer.index]), len(self.ids[layer.index]))
            if calls != (1, 1):
                raise RlparityError(f"routing capture: layer {layer.index} saw {calls[0]} router and {calls[1]} "
                                    f"experts calls, expected exactly one forward pass of each")
            got = (self.logits[layer.index][0].shape[0], self.ids[layer.index][0].shape[0])
            if got != (rows, rows):
                raise RlparityError(f"routing capture: layer {layer.index} routed {got} token rows, expected "
                                    f"{len(lengths)} sequences x {padded_len} positions = {rows}")
        routes = []
        for row, length in enumerate(lengths):
            span = slice(row * padded_len, row * padded_len + length)
            routes.append(Routing(expert_ids=[self.ids[layer.index][0][span] for layer in self.layers],
                                  router_logits=[self.logits[layer.index][0][span] for layer in self.layers]))
        return routes
