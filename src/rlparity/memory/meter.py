"""One API over the meters: phases, module attribution and adopted tensors, whatever counts the bytes.

    meter = meter_for(device)               # TrackedMeter on cpu and meta, CudaMeter on cuda
    with meter, meter.watch(model):
        meter.adopt(model.parameters(), WEIGHTS)
        with meter.phase("forward"):
            hidden = model.model(input_ids).last_hidden_state
            with meter.module("logprob"):
                logp, entropy = logprobs_and_entropy(...)
        with meter.phase("backward"):
            loss.backward()
    report = meter.report()

`watch` attributes allocations to the innermost module of a known kind, forward and backward, and
relabels a parameter's gradient as a gradient once autograd has accumulated it. Computations that are
not modules are attributed with `module(kind)` in the forward and `tag_graph` for their backward.
"""

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch.utils._pytree import tree_leaves

from rlparity.memory.report import OTHER_KIND, MemoryReport

# transformers' GPT-OSS modules by class name, so a model built on the meta device classifies alike.
GPT_OSS_KINDS = {
    "GptOssAttention": "attention",
    "GptOssTopKRouter": "router",
    "GptOssExperts": "experts",
    "GptOssRMSNorm": "norm",
    "GptOssRotaryEmbedding": "rotary",
    "Embedding": "embedding",
}
LM_HEAD_NAME = "lm_head"
KIND_KEY = "rlparity.memory.kind"  # autograd node metadata: the module kind that created the node


def gpt_oss_kind(name: str, module: torch.nn.Module) -> str | None:
    """The kind of a GPT-OSS module by its qualified name and class; None for containers and projections."""
    if name.rsplit(".", 1)[-1] == LM_HEAD_NAME:
        return "lm_head"
    return GPT_OSS_KINDS.get(type(module).__name__)


class Meter:
    """Counts bytes; subclasses say how. Use as a context manager around the measured region."""

    name = "meter"

    def __init__(self):
        self._kinds: list[str] = []
        self._phase: str | None = None

    # ---- what subclasses implement
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _begin_phase(self, name: str) -> None:
        raise NotImplementedError

    def _end_phase(self, name: str) -> None:
        raise NotImplementedError

    def _entered(self, kind: str) -> None:
        """A module of `kind` starts its forward (or `module(kind)` is entered)."""

    def _left(self, kind: str) -> None:
        """... and ends it."""

    def _gradient_ready(self, parameter: torch.Tensor) -> None:
        """autograd has accumulated parameter.grad."""

    def adopt(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count tensors that exist before the region (parameters, inputs) under `category`."""
        raise NotImplementedError

    def report(self) -> MemoryReport:
        raise NotImplementedError

    # ---- shared
    @property
    def kind(self) -> str:
        return self._kinds[-1] if self._kinds else OTHER_KIND

    @contextlib.contextmanager
    def phase(self, name: str):
        previous = self._phase
        self._phase = name
        self._begin_phase(name)
        try:
            yield self
        finally:
            self._end_phase(name)
            self._phase = previous

    @contextlib.contextmanager
    def module(self, kind: str):
        """Attribute what runs inside to `kind` (for computations that are not modules, e.g. the log-prob pass)."""
        self._push(kind)
        try:
            yield self
        finally:
            self._pop(kind)

    def _push(self, kind):
        self._kinds.append(kind)
        self._entered(kind)

    def _pop(self, kind):
        # The last entry of this kind, not the last entry: a module whose forward raised never popped its own.
        for index in range(len(self._kinds) - 1, -1, -1):
            if self._kinds[index] == kind:
                del self._kinds[index]
                break
        self._left(kind)

    @contextlib.contextmanager
    def watch(self, model: torch.nn.Module, kind_of: Callable[[str, torch.nn.Module], str | None] = gpt_oss_kind):
        """Hooks on every module `kind_of` names and on every parameter's gradient accumulation; removed on exit.

        Forward allocations go to the innermost such module. For the backward, each module's forward tags the
        autograd nodes it created with its kind (`tag_graph`), and the meter asks autograd which node is running.
        """
        handles = []
        for name, module in model.named_modules():
            kind = kind_of(name, module)
            if kind is None:
                continue

            def enter(module, args, kind=kind):
                self._push(kind)

            def leave(module, args, kwargs, output, kind=kind):
                self.tag_graph(output, (args, kwargs), kind)
                self._pop(kind)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, with_kwargs=True))
        try:
            with self.watch_gradients(model.parameters()):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def watch_gradients(self, parameters: Iterable[torch.Tensor]):
        """Count each parameter's gradient as a gradient once autograd has accumulated it."""
        handles = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in parameters if p.requires_grad]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def tag_graph(outputs, inputs, kind: str) -> None:
        """Tag the autograd nodes between `inputs` and `outputs` (any nesting of tensors) with `kind`.

        The innermost module tags first; an outer one leaves tagged nodes as they are.
        """
        stop = {t.grad_fn for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        pending = [t.grad_fn for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen = set()
        while pending:
            node = pending.pop()
            if node is None or node in stop or node in seen:
                continue
            seen.add(node)
            node.metadata.setdefault(KIND_KEY, kind)
            pending.extend(next_node for next_node, _ in node.next_functions)

    @staticmethod
    def backward_kind() -> str:
        """The kind of the module whose backward is running (OTHER_KIND when untagged or outside backward)."""
        node = torch._C._current_autograd_node()
        return OTHER_KIND if node is None else node.metadata.get(KIND_KEY, OTHER_KIND)


def meter_for(device: torch.device | str) -> Meter:
    """The meter that can count bytes on `device`: tracked live tensors on cpu and meta, the allocator on cuda."""
    device = torch.device(device)
    if device.type == "cuda":
        from rlparity.memory.cuda import CudaMeter

        return CudaMeter(device)
    from rlparity.memory.tracker import TrackedMeter

    return TrackedMeter(device)
