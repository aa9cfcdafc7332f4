"""The contract's inputs as an inference engine holds them: token-major sequences and a paged KV cache.

Engines keep keys and values in a pool of fixed-size pages. A sequence's pages are listed in order in its
row of a block table; a token's pool slot is page * page_size + offset (the slot mapping the engine writes
new tokens through). Pages are handed out in a shuffled order, so a kernel that reads the wrong page, or
assumes a sequence's pages are neighbours in memory, reads another sequence's keys.

    batch = token_batch(q, k, v, cu_seqlens)          # [tokens, heads, head_dim] and per-sequence lengths
    layout = paged_layout(batch.k_lens, page_size=16)
    k_cache = scatter_to_pages(batch.k, layout)       # [num_pages, page_size, heads_kv, head_dim]
    ...the engine's kernel writes [total_q, heads_q, head_dim]...
    out = batch.restore(out_tokens)                   # back to the contract's [batch, heads_q, seq, head_dim]

Page NULL_PAGE is never handed out: block-table rows are padded with it, as vLLM pads with its null block.
"""

import math
import zlib
from dataclasses import dataclass

import torch

from rlparity.attention.contract import split_cu_seqlens

NULL_PAGE = 0


@dataclass(frozen=True)
class TokenBatch:
    """One call's sequences, token-major: sequence i owns queries cu_q[i]:cu_q[i+1] and keys cu_k[i]:cu_k[i+1];
    its queries are the last q_lens[i] of its keys (bottom-right)."""

    q: torch.Tensor  # [total_q, heads_q, head_dim]
    k: torch.Tensor  # [total_k, heads_kv, head_dim]
    v: torch.Tensor  # [total_k, heads_kv, head_dim]
    cu_q: torch.Tensor  # [n_seqs + 1] int32
    cu_k: torch.Tensor  # [n_seqs + 1] int32
    q_shape: tuple[int, ...]  # the contract's q shape [batch, heads_q, seq, head_dim], for restore

    @property
    def q_lens(self) -> list[int]:
        return (self.cu_q[1:] - self.cu_q[:-1]).tolist()

    @property
    def k_lens(self) -> list[int]:
        return (self.cu_k[1:] - self.cu_k[:-1]).tolist()

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """[total_q, heads_q, head_dim] -> the contract's [batch, heads_q, seq, head_dim]."""
        batch, heads_q, seq, head_dim = self.q_shape
        return out.reshape(batch, seq, heads_q, head_dim).transpose(1, 2)


def token_batch(q, k, v, cu_seqlens=None) -> TokenBatch:
    """The contract's inputs as engine sequences: packed input keeps its sequences (one cu_seqlens tensor, or the
    (cu_seqlens_q, cu_seqlens_k) pair); a batch of B unpacked rows becomes B sequences of seq queries on seq_k keys.

    Raises NotImplementedError (a skip) when a sequence has more queries than keys: an engine's queries always sit
    on keys of their own sequence.
    """
    batch, heads_q, seq, head_dim = q.shape
    seq_k = k.shape[2]
    if cu_seqlens is None:
        cu_q = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (batch + 1) * seq_k, seq_k, dtype=torch.int32, device=q.device)
    else:
        cu_q, cu_k = (t.to(device=q.device, dtype=torch.int32) for t in split_cu_seqlens(cu_seqlens))
    if bool(((cu_q[1:] - cu_q[:-1]) > (cu_k[1:] - cu_k[:-1])).any()):
        raise NotImplementedError("a sequence with more queries than keys: in an engine a sequence's queries are "
                                  "the last of its keys")
    tokens = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], head_dim).contiguous()  # noqa: E731
    return TokenBatch(tokens(q), tokens(k), tokens(v), cu_q, cu_k, tuple(q.shape))


@dataclass(frozen=True)
class PagedLayout:
    """Where each sequence's keys live in a pool of pages."""

    page_size: int
    num_pages: int  # pages in the pool, NULL_PAGE included
    block_table: torch.Tensor  # [n_seqs, max_pages] int32: sequence i's pages in order, padded with NULL_PAGE
    slot_mapping: torch.Tensor  # [total_k] int64: the pool slot of each key token, sequences in order

    def pages_of(self, k_len: int) -> int:
        return math.ceil(k_len / self.page_size)


def paged_layout(k_lens, page_size: int, *, seed: int = 0, device="cpu") -> PagedLayout:
    """Pages for sequences of k_lens keys, handed out in a seeded shuffled order (deterministic per seed)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    counts = [math.ceil(length / page_size) for length in k_lens]
    used = sum(counts)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{page_size}:{list(k_lens)}".encode()))
    pages = (torch.randperm(used, generator=gen) + NULL_PAGE + 1).tolist()
    block_table = torch.full((len(k_lens), max(counts, default=0) or 1), NULL_PAGE, dtype=torch.int32)
    slots = []
    for i, (length, count) in enumerate(zip(k_lens, counts)):
        own, pages = pages[:count], pages[count:]
        block_table[i, :count] = torch.tensor(own, dtype=torch.int32)
        positions = torch.arange(length)
        slots.append(block_table[i, positions // page_size].long() * page_size + positions % page_size)
    slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
    return PagedLayout(page_size, used + 1, block_table.to(device), slot_mapping.to(device))


def scatter_to_pages(tokens: torch.Tensor, layout: PagedLayout, fill: float = float("nan")) -> torch.Tensor:
    """[total_k, heads, head_dim] -> a page pool [num_pages, page_size, heads, head_dim] holding each token at its
    slot; every other slot (the null page, the tail of each sequence's last page) holds `fill`."""
    pool = torch.full((layout.num_pages * layout.page_size, *tokens.shape[1:]), fill, dtype=tokens.dtype,
                      device=tokens.device)
    pool[layout.slot_mapping.to(tokens.device)] = tokens
    return pool.view(layout.num_pages, layout.page_size, *tokens.shape[1:])
