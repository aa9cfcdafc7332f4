"""The per-layer routing table and the near-tie census, as text lines, from a comparison as it is stored
in a result record (RoutingComparison.as_dict(), under extra["comparison"])."""

from rlparity.routing.census import LARGE_GAP_ROUNDINGS


def _number(value: float | None, spec: str = ".2g") -> str:
    return "-" if value is None else format(value, spec)


def agreement_table(comparison: dict) -> list[str]:
    lines = [
        f"{comparison['b']} vs {comparison['a']}: {comparison['tokens']} tokens; routed differently in >= 1 layer: "
        f"{comparison['differ_any_layer']:.2%}; large gap = {LARGE_GAP_ROUNDINGS:g} {comparison['dtype']} roundings "
        f"of the logits",
        f"{'layer':>5} {'set agree':>10} {'order agree':>12} {'flips':>6} {'large-gap':>10} {'inconsistent':>13} "
        f"{'median gap@flip':>16} "
        f"{'max |dlogit|':>13} {'(roundings)':>12} {'gap p1':>8} {'gap p10':>8} {'gap p50':>8} {'gap<1e-2':>9}",
    ]
    for layer in comparison["layers"]:
        gaps = layer["gaps"]
        lines.append(
            f"{layer['layer']:>5} {layer['set_agreement']:>10.2%} {layer['order_agreement']:>12.2%} "
            f"{layer['flips']:>6} {layer['large_gap_flips']:>10} {layer['inconsistent_flips']:>13} "
            f"{_number(layer['median_gap_at_flips']):>16} "
            f"{_number(layer['max_logit_diff']):>13} {_number(layer['logit_diff_roundings'], '.1f'):>12} "
            f"{_number(gaps.get('p1')):>8} {_number(gaps.get('p10')):>8} {_number(gaps.get('p50')):>8} "
            f"{_number(gaps.get('below_0.01'), '.2%'):>9}")
    for example in comparison["flagged_examples"]:
        lines.append(f"  flip rounding cannot explain: {example}")
    return lines


def _bin_label(low: float, high: float | None) -> str:
    return f"[{low:.0e}, {high:.0e})" if high is not None else f">= {low:.0e}"


def census_table(comparison: dict) -> list[str]:
    """Flips / tokens per decade of gap (side a's k-th minus (k+1)-th logit), per layer."""
    bins = comparison["layers"][0]["bins"]
    lines = [f"near-tie census ({comparison['a']}'s gaps): flips / tokens per gap interval",
             f"{'layer':>5} " + " ".join(f"{_bin_label(b['low'], b['high']):>18}" for b in bins)]
    for layer in comparison["layers"]:
        cells = [f"{b['flips']} / {b['tokens']}" for b in layer["bins"]]
        lines.append(f"{layer['layer']:>5} " + " ".join(f"{cell:>18}" for cell in cells))
    return lines
