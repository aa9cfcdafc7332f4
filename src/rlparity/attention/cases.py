"""The shape families of the sink-attention matrix, and their seeded inputs.

Small enough for the CPU (and the Triton interpreter), chosen to hit each way a backend can get the
sinks wrong: GQA, the window and its edge, packing, extreme sinks, a non-default scale.
"""

import zlib
from dataclasses import dataclass

import torch

from rlparity.errors import RlparityError

WINDOW = 16  # the edge cases sit at seq = WINDOW - 1, WINDOW, WINDOW + 1
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int = 1
    heads_q: int = 4
    heads_kv: int = 2
    seq_q: int = 32
    seq_k: int | None = None  # None: same as seq_q
    head_dim: int = 64
    causal: bool = True
    window: int | None = None
    seqlens: tuple[int, ...] | None = None  # packed sequences (batch 1, seq_q = sum)
    # keys per packed sequence when its queries are only the last of them (decode, extend on a cached prefix):
    # cu_seqlens is then the pair (cu_seqlens_q, cu_seqlens_k) and seq_k = sum
    seqlens_k: tuple[int, ...] | None = None
    sinks: tuple[float, ...] | None = None  # explicit sink logits; random N(0, 1) otherwise
    scale: float | None = None

    @property
    def keys(self) -> int:
        return self.seq_q if self.seq_k is None else self.seq_k

    def shapes(self) -> dict:
        return {
            "batch": self.batch, "heads_q": self.heads_q, "heads_kv": self.heads_kv, "seq_q": self.seq_q,
            "seq_k": self.keys, "head_dim": self.head_dim, "causal": self.causal, "window": self.window,
            "seqlens": list(self.seqlens) if self.seqlens else None, "scale": self.scale,
        } | ({"seqlens_k": list(self.seqlens_k)} if self.seqlens_k else {})


def _packed(name, seqlens, **kw) -> Case:
    return Case(name, batch=1, seq_q=sum(seqlens), seqlens=tuple(seqlens), **kw)


def _cached(name, queries, keys, **kw) -> Case:
    """Packed sequences whose queries are the last `queries[i]` of their `keys[i]` keys: what inference runs."""
    return Case(name, batch=1, seq_q=sum(queries), seq_k=sum(keys), seqlens=tuple(queries), seqlens_k=tuple(keys),
                **kw)


PAGE = 16  # the paged engines' usual page size: the inference cases cross its boundaries


CASES = (
    Case("tiny", batch=2, heads_q=2, heads_kv=2, seq_q=8),
    Case("gqa8", heads_q=8, heads_kv=1, seq_q=48),
    Case("beyond_window", seq_q=80, window=WINDOW),
    Case("window_edge_minus1", seq_q=WINDOW - 1, window=WINDOW),
    Case("window_edge", seq_q=WINDOW, window=WINDOW),
    Case("window_edge_plus1", seq_q=WINDOW + 1, window=WINDOW),
    # One query at position WINDOW: key 0 is just outside its window, key 1 is its oldest visible key.
    Case("window_edge_query", seq_q=1, seq_k=WINDOW + 1, window=WINDOW),
    Case("decode_prefix", seq_q=4, seq_k=40),
    _packed("varlen", (7, 1, 19, 13)),
    _packed("varlen_window", (7, 1, 30, 13), window=8),
    Case("sink_extremes", heads_q=4, heads_kv=2, seq_q=24, sinks=(12.0, -20.0, 0.5, -1.0)),
    Case("scale", seq_q=24, scale=0.35),
    Case("bidirectional", seq_q=24, causal=False),
    # Inference shapes: a batch of sequences of different lengths in one call, each sequence's queries the last
    # of its keys. Key lengths cross page boundaries (37 = 2 pages + 5, 17 = 1 page + 1) and sit on one (16).
    _cached("decode_batch", (1, 1, 1, 1), (37, 5, 16, 17)),
    _cached("decode_batch_window", (1, 1, 1, 1), (37, 5, 16, 17), window=WINDOW),  # 37: the window spans 2 pages
    # New tokens on cached prefixes (chunked prefill): 5 on 35, a whole prompt with no cache, 1 on 22, 9 on 24.
    _cached("extend", (5, 16, 1, 9), (40, 16, 23, 33)),
    _cached("extend_window", (5, 16, 1, 9), (40, 16, 23, 33), window=8),
    # Long enough that split-KV decoders cut each sequence into several segments.
    _cached("decode_long", (1, 1), (300, 1030)),
)
# GPT-OSS-sized cases (64 query heads, 8 KV heads, window 128) that run many tiles of a flash kernel's
# real CUDA block configuration, which the small cases never reach. Run on CUDA only: their float64
# reference materialises 2 GiB score tensors.
GPT_OSS_WINDOW = 128
LARGE_CASES = (
    Case("gpt_oss_causal_2k", heads_q=64, heads_kv=8, seq_q=2048),
    Case("gpt_oss_window_2k", heads_q=64, heads_kv=8, seq_q=2048, window=GPT_OSS_WINDOW),
    Case("gpt_oss_decode_2k", heads_q=64, heads_kv=8, seq_q=64, seq_k=2048, window=GPT_OSS_WINDOW),
    _packed("varlen_window_2k", (700, 1, 1100, 247), heads_q=16, heads_kv=2, window=GPT_OSS_WINDOW),
    Case("head_dim128_causal_1k", heads_q=16, heads_kv=2, seq_q=1024, head_dim=128),
)
CASES_BY_NAME = {case.name: case for case in CASES + LARGE_CASES}


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sinks: torch.Tensor
    dout: torch.Tensor
    dlse: torch.Tensor
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None

    def tensors(self):
        return self.q, self.k, self.v, self.sinks


def named(table: dict, text: str, what: str) -> list[str]:
    """The comma-separated names of `text`, each a key of `table` (a command's --case or --dtype), else a one-line
    error naming the first unknown one."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        raise RlparityError(f"unknown {what} {(unknown or [text])[0]!r}: expected one of {', '.join(table)}")
    return names


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device | str = "cpu") -> Inputs:
    """Seeded per case: random normal values drawn in float64 and rounded to `dtype`."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    q = normal(case.batch, case.heads_q, case.seq_q, case.head_dim)
    k = normal(case.batch, case.heads_kv, case.keys, case.head_dim)
    v = normal(case.batch, case.heads_kv, case.keys, case.head_dim)
    if case.sinks is not None:
        if len(case.sinks) != case.heads_q:
            raise ValueError(f"case {case.name}: {len(case.sinks)} sinks for {case.heads_q} query heads")
        sinks = torch.tensor(case.sinks, dtype=torch.float64).to(dtype).to(device)
    else:
        sinks = normal(case.heads_q)
    dout = normal(case.batch, case.heads_q, case.seq_q, case.head_dim)
    dlse = normal(case.batch, case.heads_q, case.seq_q)
    cu_seqlens = None
    if case.seqlens is not None:
        cu_seqlens = _offsets(case.seqlens, device)
        if case.seqlens_k is not None:
            cu_seqlens = (cu_seqlens, _offsets(case.seqlens_k, device))
    return Inputs(q, k, v, sinks, dout, dlse, cu_seqlens)


def _offsets(lengths, device) -> torch.Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def attend_kwargs(case: Case, inputs: Inputs) -> dict:
    return {"causal": case.causal, "window": case.window, "scale": case.scale, "cu_seqlens": inputs.cu_seqlens}


def timing_inputs(seq: int, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device | str, with_grad: bool):
    """((q, k, v, sinks), dout) for one batch of `seq` tokens, drawn on `device` (seeded by seq): benchmark and
    tuning inputs at sizes too large to draw in float64 on the CPU as make_inputs does."""
    gen = torch.Generator(device=device).manual_seed(seq)

    def normal(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype).requires_grad_(with_grad)

    q = normal(1, heads_q, seq, head_dim)
    k, v = normal(1, heads_kv, seq, head_dim), normal(1, heads_kv, seq, head_dim)
    sinks = normal(heads_q)
    return (q, k, v, sinks), torch.randn(q.shape, generator=gen, device=device, dtype=dtype)
