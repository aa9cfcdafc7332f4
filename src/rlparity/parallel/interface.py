"""The interface of a sequence-parallel attention, and its implementations by name.

Every rank of the process group calls the same function:

    attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None)
        -> (out, lse)

q: [batch, heads_q, seq / P, head_dim]; k, v: [batch, heads_kv, seq / P, head_dim]: this rank's
   contiguous shard of the sequence (rank r holds tokens [r seq/P, (r+1) seq/P), all heads; the
   layout of rlparity.parallel.shard). q and k hold the same positions (self-attention).
sinks: [heads_q], the whole tensor on every rank (a replicated parameter). The gradient a rank
   returns for it is that rank's contribution; the caller sums it over the group for the full dSink
   (as data parallelism does for any replicated parameter).
causal, window, scale: as in the attention contract, for the whole sequence.
cu_seqlens: packed input (batch 1): int32 offsets [n_seqs + 1] over the whole sequence (0 .. seq),
   the same tensor on every rank; sequences need not align with the shards.
group: the process group (None: the default group); P = its size.
out: [batch, heads_q, seq / P, head_dim] in q's dtype; lse: [batch, heads_q, seq / P] in float32
   (float64 for float64 input): this rank's rows of the whole-sequence result, sink included.
   Gradients flow to q, k, v and sinks through both.

The check (rlparity.parallel.check) holds every rank's (out, lse) to those shapes and dtypes, on all
ranks at once, before it gathers them. An exception in the forward on some ranks ends the case at
once on every rank; one in the backward, after the collective timeout (`--timeout`).
rlparity's implementations check their input with `rlparity.parallel.check_shards` (a sequence that
does not split evenly, cu_seqlens not over the whole sequence, a sinks tensor of the wrong shape:
the same one-line error on every rank); a user's may call it too.

An implementation is named by a registered name ("ulysses", "ring") or "module:function"; both go
through the one resolver (rlparity.doors). An implementation that takes an `inner` keyword (an
attention backend for its per-rank kernel, as rlparity's own do) can be given one.
"""

import functools
import inspect
from dataclasses import dataclass

from rlparity.attention.registry import get_backend
from rlparity.doors import resolve_callable
from rlparity.errors import RlparityError

SP_KEYWORDS = ("causal", "window", "scale", "cu_seqlens", "group")
DOOR = "sequence-parallel attention"
IMPLEMENTATIONS = {"ulysses": "rlparity.parallel.ulysses:attend", "ring": "rlparity.parallel.ring:attend"}


@dataclass(frozen=True)
class SPImplementation:
    """What every rank resolves and calls: strings only, so that it travels to the ranks by value."""

    target: str  # a registered name or "module:function"
    inner: str | None = None  # the attention backend passed as `inner=`, for implementations that take one

    @property
    def name(self) -> str:
        return self.target if self.inner is None else f"{self.target}[{self.inner}]"

    def load(self):
        """The function of the interface, `inner` bound; a one-line RlparityError if it cannot be."""
        registered = self.target in IMPLEMENTATIONS
        fn = resolve_callable(IMPLEMENTATIONS.get(self.target, self.target),
                              f"{DOOR} {self.target!r} at" if registered else DOOR)
        parameters = check_signature(fn, self.target)
        if self.inner is None:
            return fn
        get_backend(self.inner)  # an unknown kernel is the caller's error, named now
        if "inner" not in parameters:
            raise RlparityError(f"{DOOR} {self.target!r}: an inner kernel ({self.inner!r}) was given, but "
                                f"{fn.__name__} takes no `inner` keyword")
        return functools.partial(fn, inner=self.inner)


def get_implementation(name_or_target: str, inner: str | None = None) -> SPImplementation:
    """A registered implementation or a user's "module:function", checked to load here and now."""
    if name_or_target not in IMPLEMENTATIONS and ":" not in name_or_target:
        raise RlparityError(f"unknown {DOOR} {name_or_target!r}: expected one of {', '.join(IMPLEMENTATIONS)} "
                            "or a 'module:function' path")
    implementation = SPImplementation(name_or_target, inner)
    implementation.load()
    return implementation


def with_inner_kernels(name_or_target: str, inners) -> list[SPImplementation]:
    """The implementation once per inner kernel when it takes `inner` (rlparity's own), else once as it is."""
    if "inner" in check_signature(SPImplementation(name_or_target).load(), name_or_target):
        return [SPImplementation(name_or_target, inner) for inner in inners]
    return [SPImplementation(name_or_target)]


def check_signature(fn, name: str) -> dict:
    """The parameters of `fn`, if it can be called as the interface says; else a one-line error."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}  # builtins and C extensions do not expose one; the call itself will tell
    takes_any_keyword = any(p.kind == p.VAR_KEYWORD for p in params.values())
    missing = [] if takes_any_keyword else [kw for kw in SP_KEYWORDS if kw not in params]
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
    if missing or (len(positional) < 4 and not takes_varargs):
        raise RlparityError(f"{DOOR} {name!r}: expected signature attend(q, k, v, sinks, *, causal, window, scale, "
                            f"cu_seqlens, group), got {fn.__name__}{inspect.signature(fn)}")
    return dict(params) | ({"inner": None} if takes_any_keyword else {})
