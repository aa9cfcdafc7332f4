"""A user's sequence-parallel attention as a user writes one: rlparity's Ulysses behind the interface
(rlparity.parallel.interface), with the user's choice of per-rank kernel. Checked as
`rlparity check sequence-parallel --impl tests.user_sequence_parallel:attend`."""

from rlparity.parallel import ulysses_attend


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None):
    return ulysses_attend(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens,
                          inner="reference", group=group)
