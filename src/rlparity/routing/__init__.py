"""MoE routing as a first-class result: capture, per-layer agreement, the near-tie census, replay.

    capture      RouterCapture: forward hooks on every router of a transformers GPT-OSS model
    forward      run_pass: the trainer's forward on a padded batch -> per-sequence log-probs and routes
    agreement    compare_routing: per-layer set/order agreement and flips between two sides
    census       gaps between the k-th and (k+1)-th router logit; what counts as a large gap
    precision    the router alone in bf16 vs fp32 on the same hidden states
    replay       RouterReplay: force recorded routes (optionally weights) in the trainer's forward, verified
                 to take effect
    variants     replay as trainers run it (none, ids, ids+weights, R2) measured side by side
    checks       the conformance checks, one Record each
    engines      hf / reference / vllm opened by name for routing
    report, cli  the per-layer table and `rlparity routing` (replay_command: its --replay table)
"""

from rlparity.routing.agreement import LayerAgreement, RoutingComparison, coarser_dtype, compare_routing
from rlparity.routing.capture import RouterCapture
from rlparity.routing.census import LARGE_GAP_ROUNDINGS, large_gap_threshold, topk_gaps
from rlparity.routing.forward import Pass, run_pass
from rlparity.routing.replay import RouterReplay, replayed_pass

__all__ = [
    "LARGE_GAP_ROUNDINGS",
    "LayerAgreement",
    "Pass",
    "RouterCapture",
    "RouterReplay",
    "RoutingComparison",
    "coarser_dtype",
    "compare_routing",
    "large_gap_threshold",
    "replayed_pass",
    "run_pass",
    "topk_gaps",
]
