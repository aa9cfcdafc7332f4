"""Peak memory on a CUDA device, from the caching allocator's own counters.

Phase peaks are `max_memory_allocated` between a reset at the phase's start and its end; the
allocator's reservation (`max_memory_reserved`, what nvidia-smi sees less the context) is reported
beside them. The allocator counts bytes, not tensors, so by-module attribution is the allocated
bytes a module's forward retains (allocated at its exit minus at its entry, less its children's): it
includes the module's output until the caller frees it, which the CPU tracker does not. With
`snapshot_path`, the allocator records every allocation's stack; `dump_snapshot` writes them (open the
pickle at https://pytorch.org/memory_viz), and a region that raises dumps them by itself.
"""

from collections import Counter
from pathlib import Path

import torch

from rlparity.errors import RlparityError
from rlparity.memory.meter import Meter
from rlparity.memory.report import ACTIVATIONS, FORWARD_PHASE, GRADIENTS, MemoryReport

# Allocation events the history keeps: one layer's or one small model's step makes a few thousand; at several
# KB per entry (torch.cuda.memory._dump_snapshot's docs) the snapshot stays near 100 MB.
HISTORY_ENTRIES = 20_000


def _storage_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class CudaMeter(Meter):
    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda", snapshot_path: str | Path | None = None,
                 history_entries: int = HISTORY_ENTRIES):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RlparityError(f"CudaMeter needs a visible CUDA device, got {self.device} "
                                f"(torch.cuda.is_available() is {torch.cuda.is_available()}); on CPU use TrackedMeter")
        self.snapshot_path = None if snapshot_path is None else Path(snapshot_path)
        self.history_entries = history_entries
        self._adopted: dict[str, list] = {}
        self._grad_params: dict[int, torch.Tensor] = {}
        self._frames: list[list] = []  # [kind, allocated at entry, retained by child modules]
        self._activations: Counter = Counter()
        self._phase_peak: dict[str, int] = {}
        self._end_of: dict[str, dict[str, int]] = {}
        self._peak = 0
        self._reserved_peak = 0

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def _collect_peaks(self) -> int:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self._peak = max(self._peak, peak)
        self._reserved_peak = max(self._reserved_peak, torch.cuda.max_memory_reserved(self.device))
        return peak

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        if self.snapshot_path is not None:
            torch.cuda.memory._record_memory_history(max_entries=self.history_entries, device=self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, exc_type, exc, traceback):
        self._collect_peaks()
        if self.snapshot_path is not None:
            if exc_type is not None:
                self.dump_snapshot(self.snapshot_path)
            torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
        return False

    def dump_snapshot(self, path: str | Path) -> Path:
        """Write the allocator's recorded history (needs snapshot_path set when the meter was made)."""
        if self.snapshot_path is None:
            raise RlparityError("CudaMeter.dump_snapshot: no history was recorded; pass snapshot_path= to CudaMeter")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def adopt(self, tensors, category: str) -> None:
        self._adopted.setdefault(category, []).extend(t for t in tensors if isinstance(t, torch.Tensor))

    def _begin_phase(self, name: str) -> None:
        self._collect_peaks()
        torch.cuda.reset_peak_memory_stats(self.device)

    def _end_phase(self, name: str) -> None:
        self._phase_peak[name] = max(self._phase_peak.get(name, 0), self._collect_peaks())
        categories = {category: _storage_bytes(tensors) for category, tensors in self._adopted.items()}
        categories[GRADIENTS] = _storage_bytes(p.grad for p in self._grad_params.values())
        if name == FORWARD_PHASE:
            categories |= {f"{ACTIVATIONS}.{kind}": count for kind, count in self._activations.items()}
        categories["allocated"] = self._allocated()
        self._end_of[name] = {k: v for k, v in categories.items() if v}

    def _entered(self, kind: str) -> None:
        if self._phase == FORWARD_PHASE:
            self._frames.append([kind, self._allocated(), 0])

    def _left(self, kind: str) -> None:
        if self._phase != FORWARD_PHASE or not self._frames:
            return
        frame_kind, at_entry, children = self._frames.pop()
        retained = self._allocated() - at_entry
        self._activations[frame_kind] += retained - children
        if self._frames:
            self._frames[-1][2] += retained

    def _gradient_ready(self, parameter: torch.Tensor) -> None:
        self._grad_params[id(parameter)] = parameter

    def report(self) -> MemoryReport:
        return MemoryReport(meter=self.name, peak=self._peak, phase_peak=dict(self._phase_peak),
                            end_of=dict(self._end_of), reserved_peak=self._reserved_peak)
