"""Live tensor bytes without a GPU: every storage an op creates, counted until it is freed.

A TorchDispatchMode sees every op's outputs, forward and backward (autograd runs CPU and meta
backwards on the calling thread, under the same mode). A new storage is one that is neither tracked
nor the storage of one of the op's inputs (views and in-place results share their input's); it is
labelled with the phase and the module kind at that moment (in the backward, the kind the forward
tagged on the autograd node that is running), and a weakref finalizer on the storage takes its bytes
off when it dies. On the meta device the same ops allocate nothing, but
storages still carry their sizes and lifetimes, so a real-size GPT-OSS layer is counted exactly as
it would be allocated (rlparity.memory.fake).

Tensors built from Python data (`torch.tensor(0.0)`, AdamW's step counts) are made without dispatch and
are not seen unless adopted; in a training step they are scalars.

What this counts is what a caching allocator would have to hand out at least: it has no block
rounding, no fragmentation and no allocator cache, which the CUDA meter reports as `reserved`.
Process RSS would add the allocator's and the interpreter's own memory; tracemalloc sees no torch
allocation at all.
"""

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlparity.memory.meter import Meter
from rlparity.memory.report import (
    ACTIVATIONS,
    BACKWARD,
    BACKWARD_PHASE,
    FORWARD_PHASE,
    GRADIENTS,
    OPTIMIZER_PHASE,
    OPTIMIZER_STATE,
    MemoryReport,
)

# Allocations made in these phases are named after what they become, not after the phase.
PHASE_CATEGORIES = {FORWARD_PHASE: ACTIVATIONS, BACKWARD_PHASE: BACKWARD, OPTIMIZER_PHASE: OPTIMIZER_STATE}
SETUP = "setup"  # allocations outside any phase


def _storage(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class _LiveBytes(TorchDispatchMode):
    """The dispatch mode: calls back into the meter for every storage an op creates."""

    def __init__(self, meter: "TrackedMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(s) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and (s := _storage(t))}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and (storage := _storage(tensor)) is not None:
                self.meter._saw(storage, is_input=id(storage) in inputs)
        return out


class TrackedMeter(Meter):
    """Live tensor bytes on cpu or meta tensors, by phase and by module kind."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.name = f"{self.device.type}-tracked"
        self._mode = _LiveBytes(self)
        self._live: dict[int, list] = {}  # id(storage) -> [category, bytes]
        self._by_category: Counter = Counter()
        self._current = 0
        self._peak = 0
        self._at_peak: dict[str, int] = {}
        self._category_peak: Counter = Counter()
        self._phase_peak: dict[str, int] = {}
        self._end_of: dict[str, dict[str, int]] = {}
        self._active = False

    # ---- region
    def __enter__(self):
        self._active = True
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._active = False
        return False

    @property
    def current(self) -> int:
        return self._current

    def category(self) -> str:
        if self._phase is None:
            return SETUP
        category = PHASE_CATEGORIES.get(self._phase, self._phase)
        if category == ACTIVATIONS:
            return f"{category}.{self.kind}"
        if category == BACKWARD:
            return f"{category}.{self.backward_kind()}"
        return category

    # ---- accounting
    def _saw(self, storage, is_input: bool) -> None:
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None:
            grown = storage.nbytes() - entry[1]  # resize_ and out= ops can grow a tracked storage
            if grown:
                self._change(entry[0], grown)
                entry[1] += grown
            return
        if is_input:
            return  # a view of, or an in-place result on, a storage that existed before the region
        self._add(storage, self.category())

    def _add(self, storage, category: str) -> None:
        count = storage.nbytes()
        self._live[id(storage)] = [category, count]
        weakref.finalize(storage, self._release, id(storage))
        self._change(category, count)

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._change(entry[0], -entry[1])

    def _change(self, category: str, delta: int) -> None:
        self._by_category[category] += delta
        self._current += delta
        if not self._active:
            return
        if delta > 0:
            if self._by_category[category] > self._category_peak[category]:
                self._category_peak[category] = self._by_category[category]
            if self._current > self._peak:
                self._peak = self._current
                self._at_peak = {k: v for k, v in self._by_category.items() if v}
            if self._phase is not None and self._current > self._phase_peak.get(self._phase, 0):
                self._phase_peak[self._phase] = self._current

    def relabel(self, tensor: torch.Tensor, category: str) -> None:
        """Count a tracked tensor's storage under another category from now on."""
        storage = _storage(tensor)
        entry = None if storage is None else self._live.get(id(storage))
        if entry is not None and entry[0] != category:
            self._change(entry[0], -entry[1])
            entry[0] = category
            self._change(category, entry[1])

    # ---- Meter
    def adopt(self, tensors, category: str) -> None:
        for tensor in tensors:
            storage = _storage(tensor)
            if storage is None:
                continue
            if id(storage) in self._live:
                self.relabel(tensor, category)
            else:
                self._add(storage, category)

    def _begin_phase(self, name: str) -> None:
        self._phase_peak[name] = max(self._phase_peak.get(name, 0), self._current)

    def _end_phase(self, name: str) -> None:
        self._end_of[name] = {k: v for k, v in self._by_category.items() if v}

    def _gradient_ready(self, parameter: torch.Tensor) -> None:
        if parameter.grad is not None:
            self.relabel(parameter.grad, GRADIENTS)

    def report(self) -> MemoryReport:
        return MemoryReport(
            meter=self.name, peak=self._peak, phase_peak=dict(self._phase_peak), end_of=dict(self._end_of),
            category_peak={k: v for k, v in self._category_peak.items() if v}, at_peak=dict(self._at_peak),
        )
