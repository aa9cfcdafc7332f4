"""Exact FLOP counts of sink attention from its shapes: only the (query, key) pairs the mask lets through.

A pair costs 2 * head_dim FLOPs in each matmul it enters. The forward has two (S = QK^T, O = PV); the
backward five (S recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q), i.e. 2.5x the forward,
FlashAttention's own convention. Softmax, exp and the sink add O(pairs) elementwise work, not counted.
"""

FORWARD_MATMULS = 2
BACKWARD_MATMULS = 5


def visible_pairs(seq_q: int, seq_k: int, *, causal: bool = True, window: int | None = None,
                  seqlens: tuple[int, ...] | None = None) -> int:
    """Number of visible (query, key) pairs per (batch, head), counted exactly in O(seq) time.

    Same rules as rlparity.reference.visible_keys: queries are the last seq_q positions; a query at
    position p sees keys j <= p (causal) with j > p - window; packed sequences see only themselves.
    """
    if seqlens is not None:
        return sum(visible_pairs(n, n, causal=causal, window=window) for n in seqlens)
    total = 0
    for p in range(seq_k - seq_q, seq_k):
        hi = min(p + 1, seq_k) if causal else seq_k
        lo = max(0, p - window + 1) if window is not None else 0
        total += max(0, hi - lo)
    return total


def attention_flops(batch: int, heads_q: int, seq_q: int, seq_k: int, head_dim: int, *, causal: bool = True,
                    window: int | None = None, seqlens: tuple[int, ...] | None = None,
                    backward: bool = False) -> int:
    """Matmul FLOPs of the forward, or of forward + backward when `backward`."""
    pairs = visible_pairs(seq_q, seq_k, causal=causal, window=window, seqlens=seqlens)
    matmuls = FORWARD_MATMULS + (BACKWARD_MATMULS if backward else 0)
    return matmuls * 2 * head_dim * pairs * batch * heads_q


def matmul_peak_tflops(size: int = 8192, repeats: int = 20, device: str = "cuda") -> float:
    """The bf16 matmul ceiling to judge an attention kernel by: best of `repeats` square GEMMs on random
    data (zeros run faster than real data), each timed with CUDA events after three warm-ups."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return 2 * size**3 / best / 1e12
