"""What every meter returns: peak bytes by time phase and by category, plus byte-size parsing and printing.

Categories name what the bytes are for:

    weights, gradients, optimizer_state, fsdp_gather, inputs
    activations.<kind>   allocated in the forward of a module of that kind (attention, router, experts,
                         norm, embedding, rotary, lm_head, logprob, other); live at the forward's end,
                         they are what autograd saved for the backward
    backward.<kind>      allocated in the backward of a module of that kind, until it becomes a gradient
    <phase>              allocated in any other phase (e.g. "setup")
"""

import re
from dataclasses import dataclass, field

from rlparity.errors import RlparityError

WEIGHTS, GRADIENTS, OPTIMIZER_STATE, FSDP_GATHER, INPUTS = (
    "weights", "gradients", "optimizer_state", "fsdp_gather", "inputs")
ACTIVATIONS, BACKWARD = "activations", "backward"
FORWARD_PHASE, BACKWARD_PHASE, OPTIMIZER_PHASE = "forward", "backward", "optimizer"
OTHER_KIND = "other"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '1.5TiB', '1024' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise RlparityError(f"cannot read {text!r} as a size: expected a number with an optional unit "
                            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    """Binary units, three significant figures: 1.50 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"


def activation_kind(category: str) -> str | None:
    """'activations.experts' -> 'experts'; None for any other category."""
    prefix = ACTIVATIONS + "."
    return category[len(prefix):] if category.startswith(prefix) else None


@dataclass
class MemoryReport:
    """Bytes a region held, as one meter saw them."""

    meter: str  # "cpu-tracked", "meta-tracked" or "cuda"
    peak: int  # the most bytes live at once over the whole region
    phase_peak: dict[str, int] = field(default_factory=dict)  # phase -> most bytes live while it ran
    end_of: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> category -> bytes live at its end
    category_peak: dict[str, int] = field(default_factory=dict)  # category -> the most bytes it held at once
    at_peak: dict[str, int] = field(default_factory=dict)  # category -> bytes live at the moment of `peak`
    reserved_peak: int | None = None  # CUDA: the caching allocator's peak reservation

    def saved_activations(self) -> dict[str, int]:
        """Module kind -> bytes allocated in its forward and still live when the forward ended."""
        end = self.end_of.get(FORWARD_PHASE, {})
        return {kind: count for category, count in end.items() if (kind := activation_kind(category))}

    def as_dict(self) -> dict:
        return {"meter": self.meter, "peak": self.peak, "phase_peak": self.phase_peak, "end_of": self.end_of,
                "category_peak": self.category_peak, "at_peak": self.at_peak, "reserved_peak": self.reserved_peak}
