"""What an engine's log-probs are, found by measurement against the trainer's full logits.

Given the trainer's logits z for every position of a batch and the engine's per-token values e, each
hypothesis predicts e in closed form; the one whose prediction fits within the tolerance names what the
engine computed:

    semantics   log-softmax(z / T) after top-k or top-p, renormalised (rlparity.engines.sampling), with T and
                k or p fitted; or unnormalised logits z_x (no log-softmax at all)
    alignment   the requested distribution, but value j scored at another position: the response window
                shifted by d tokens (value j is log p(x_t | x_<t) at t = prompt_len + j + d), or the logits at t
                scored against token t itself (the next-token shift missing)

Predictions are compared position by position: both -inf agree, one -inf does not.
"""

import math
from dataclasses import dataclass, field

import torch

from rlparity.engines.base import Sampling
from rlparity.engines.sampling import sampling_logprobs

ALIGNMENT_SHIFTS = (-2, -1, 1, 2)
# Temperatures searched: a log-spaced grid wide enough for any sampling setup, then golden-section refinement.
TEMPERATURE_RANGE = (0.05, 20.0)
TEMPERATURE_GRID = 31
GOLDEN_STEPS = 20
# The temperature search scores this many positions (evenly spaced); the chosen fit is judged on every position.
SEARCH_POSITIONS = 128


@dataclass
class Scored:
    """The trainer's view of a batch: per sequence, logits [S, V] (float64) and token ids [S]."""

    logits: list[torch.Tensor]
    token_ids: list[torch.Tensor]
    prompt_len: list[int]

    @property
    def response_lengths(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.token_ids, self.prompt_len)]


@dataclass
class Fit:
    name: str  # short, e.g. "temperature 0.7", "window shifted -1"
    kind: str  # "semantics" or "alignment"
    residual: float  # max |engine - prediction|
    predicted: torch.Tensor  # [N] the prediction, concatenated over sequences
    sampling: Sampling | None = None  # semantics: the distribution that fits
    shift: int = 0  # alignment: d
    unshifted: bool = False  # alignment: logits at t scored against token t
    ranges: dict = field(default_factory=dict)  # parameter ranges consistent with the tolerance


def residuals(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """|observed - predicted| per position; 0 where both are -inf, inf where only one is finite."""
    both_infinite = torch.isneginf(predicted) & torch.isneginf(observed)
    difference = (observed - predicted).abs()
    difference = torch.where(torch.isnan(difference), torch.full_like(difference, math.inf), difference)
    return torch.where(both_infinite, torch.zeros_like(difference), difference)


def max_residual(predicted: torch.Tensor, observed: torch.Tensor) -> float:
    return residuals(predicted, observed).max().item() if observed.numel() else 0.0


def positions(scored: Scored, lengths: list[int], shift: int = 0, unshifted: bool = False):
    """(logit rows [N, V], targets [N]) for value j of each sequence scored at t = prompt_len + j + shift,
    or None when that reaches outside a sequence."""
    rows, targets = [], []
    for logits, ids, prompt, length in zip(scored.logits, scored.token_ids, scored.prompt_len, lengths):
        t = torch.arange(length) + prompt + shift
        row = t if unshifted else t - 1
        if length and (row.min() < 0 or t.max() >= len(ids)):
            return None
        rows.append(logits[row])
        targets.append(ids[t])
    return torch.cat(rows), torch.cat(targets)


def predict(rows: torch.Tensor, targets: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    return sampling_logprobs(rows, sampling).gather(-1, targets[:, None])[:, 0]


def as_processed(sampling: Sampling) -> Sampling:
    """Raw log-probs are the processed ones of T = 1 without truncation."""
    if sampling.logprobs == "raw":
        return Sampling(logprobs="processed")
    return sampling


# --- alignment --------------------------------------------------------------------------------------------------

def alignment_fits(scored: Scored, lengths: list[int], observed: torch.Tensor, asked: Sampling) -> list[Fit]:
    fits = []
    for shift in (0, *ALIGNMENT_SHIFTS):
        for unshifted in (False, True):
            if shift == 0 and not unshifted and lengths == scored.response_lengths:
                continue  # the expected alignment, judged by the caller
            where = positions(scored, lengths, shift, unshifted)
            if where is None:
                continue
            predicted = predict(*where, asked)
            name = "next-token shift missing" if unshifted else f"window shifted {shift:+d}"
            if unshifted and shift:
                name += f", window shifted {shift:+d}"
            fits.append(Fit(name, "alignment", max_residual(predicted, observed), predicted, shift=shift,
                            unshifted=unshifted))
    return fits


# --- semantics --------------------------------------------------------------------------------------------------

class Ranked:
    """The trainer's logits sorted once: temperature keeps their order, so every fitted T reuses it.

    sorted [N, V] logits, largest first; target [N] the target's logit; rank [N] how many logits exceed it.
    """

    def __init__(self, rows: torch.Tensor, targets: torch.Tensor):
        self.rows, self.targets = rows, targets
        self.sorted = rows.sort(dim=-1, descending=True).values
        self.target = rows.gather(-1, targets[:, None])[:, 0]
        self.rank = (rows > self.target[:, None]).sum(dim=-1)

    def subset(self, index: torch.Tensor) -> "Ranked":
        part = Ranked.__new__(Ranked)
        part.rows, part.targets, part.sorted = self.rows[index], self.targets[index], self.sorted[index]
        part.target, part.rank = self.target[index], self.rank[index]
        return part

    def at(self, temperature: float):
        """(target log-prob at T [N], cumulative mass of the j+1 most probable tokens at T [N, V])."""
        scaled = self.sorted / temperature
        normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
        cumulative = (scaled - normaliser).exp().cumsum(dim=-1).clamp(max=1.0)
        return self.target / temperature - normaliser[:, 0], cumulative


def _kept_prediction(target_logp, cumulative, rank, kept_count) -> torch.Tensor:
    """Renormalised over the kept_count [N] most probable tokens: log p - log(kept mass), -inf if the target is out."""
    mass = cumulative.gather(-1, (kept_count - 1).clamp(min=0)[:, None])[:, 0]
    inside = rank < kept_count
    return torch.where(inside, target_logp - mass.log(), torch.full_like(target_logp, -math.inf))


def _consistent_counts(target_logp, cumulative, rank, observed, tol):
    """[N, V] True where keeping the j+1 most probable tokens, renormalised, explains position i's value."""
    finite = torch.isfinite(observed)
    shift = observed - target_logp  # renormalisation adds -log(kept mass)
    kept = torch.arange(cumulative.shape[-1])[None, :] >= rank[:, None]  # the target is among the j+1 kept
    explains = ((-cumulative.log()) - shift[:, None]).abs() <= tol
    return torch.where(finite[:, None], explains & kept, ~kept), finite, shift


def _estimate_top_k(ranked: Ranked, target_logp, cumulative, observed, tol):
    consistent, finite, shift = _consistent_counts(target_logp, cumulative, ranked.rank, observed, tol)
    feasible = consistent.all(dim=0).nonzero()[:, 0] + 1
    if len(feasible):
        return int(feasible[0]), {"top_k": (int(feasible[0]), int(feasible[-1]))}
    # No k fits every position: the k whose worst position is closest, to score the hypothesis.
    misfit = torch.where(finite[:, None], ((-cumulative.log()) - shift[:, None]).abs(), torch.zeros_like(cumulative))
    return int(misfit.max(dim=0).values.argmin()) + 1, {}


def _nice_in(low: float, high: float) -> float:
    """The number with fewest decimals in (low, high]."""
    for decimals in range(1, 8):
        candidate = math.floor(high * 10 ** decimals) / 10 ** decimals
        if candidate > low:
            return candidate
    return high


def _estimate_top_p(ranked: Ranked, target_logp, cumulative, observed, tol):
    consistent, finite, shift = _consistent_counts(target_logp, cumulative, ranked.rank, observed, tol)
    # keeping m tokens means p in (C[m - 1], C[m]] (C[0] = 0): intersect each position's range of m
    padded = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative], dim=-1)  # padded[:, m] = C[m]
    if bool(consistent.any(dim=-1).all()):
        counts = torch.arange(1, cumulative.shape[-1] + 1)[None, :]
        low_m = torch.where(consistent, counts, cumulative.shape[-1] + 1).min(dim=-1).values
        high_m = torch.where(consistent, counts, 0).max(dim=-1).values
        low = padded.gather(-1, (low_m - 1)[:, None]).max().item()
        high = padded.gather(-1, high_m[:, None]).min().item()
        if low < high:
            return _nice_in(low, high), {"top_p": (low, high)}
    best = ((-cumulative.log()) - shift[:, None]).abs().argmin(dim=-1)
    mass = cumulative.gather(-1, best[:, None])[:, 0]
    return float(mass[finite].median()) if bool(finite.any()) else 1.0, {}


def _candidate(family: str, ranked: Ranked, observed, temperature: float, tol: float):
    """(the family's distribution at T with its parameter estimated, consistent ranges, a fast prediction)."""
    target_logp, cumulative = ranked.at(temperature)
    if family == "temperature":
        return Sampling(temperature=temperature, logprobs="processed"), {}, target_logp
    if family == "top_k":
        k, ranges = _estimate_top_k(ranked, target_logp, cumulative, observed, tol)
        kept = torch.full_like(ranked.rank, k)
        return (Sampling(temperature=temperature, top_k=k, logprobs="processed"), ranges,
                _kept_prediction(target_logp, cumulative, ranked.rank, kept))
    p, ranges = _estimate_top_p(ranked, target_logp, cumulative, observed, tol)
    p = min(max(p, 1e-6), 1.0)
    kept = (torch.searchsorted(cumulative, torch.full_like(target_logp, p)[:, None])[:, 0] + 1).clamp(
        max=cumulative.shape[-1])
    return (Sampling(temperature=temperature, top_p=p, logprobs="processed"), ranges,
            _kept_prediction(target_logp, cumulative, ranked.rank, kept))


def _search_score(family, ranked, observed, temperature, tol) -> float:
    return max_residual(_candidate(family, ranked, observed, temperature, tol)[2], observed)


def _exact(family, ranked, observed, temperature, tol):
    """(residual, sampling, ranges, prediction) with the prediction from rlparity.engines.sampling itself."""
    sampling, ranges, _ = _candidate(family, ranked, observed, temperature, tol)
    predicted = predict(ranked.rows, ranked.targets, sampling)
    return max_residual(predicted, observed), sampling, ranges, predicted


def _fit_temperature(family, ranked, observed, tol) -> float:
    """A log-spaced grid over TEMPERATURE_RANGE (and T = 1), then golden-section search around the best point."""
    grid = torch.logspace(math.log10(TEMPERATURE_RANGE[0]), math.log10(TEMPERATURE_RANGE[1]), TEMPERATURE_GRID)
    temperatures = sorted({*grid.tolist(), 1.0})
    scores = [_search_score(family, ranked, observed, t, tol) for t in temperatures]
    best = min(range(len(scores)), key=scores.__getitem__)
    low = math.log(temperatures[max(best - 1, 0)])
    high = math.log(temperatures[min(best + 1, len(temperatures) - 1)])
    golden = (math.sqrt(5) - 1) / 2
    left, right = high - golden * (high - low), low + golden * (high - low)
    left_score = _search_score(family, ranked, observed, math.exp(left), tol)
    right_score = _search_score(family, ranked, observed, math.exp(right), tol)
    for _ in range(GOLDEN_STEPS):
        if left_score <= right_score:
            high, right, right_score = right, left, left_score
            left = high - golden * (high - low)
            left_score = _search_score(family, ranked, observed, math.exp(left), tol)
        else:
            low, left, left_score = left, right, right_score
            right = low + golden * (high - low)
            right_score = _search_score(family, ranked, observed, math.exp(right), tol)
    refined = math.exp((low + high) / 2)
    return min((scores[best], temperatures[best]),
               (_search_score(family, ranked, observed, refined, tol), refined))[1]


def _search_positions(count: int) -> torch.Tensor:
    return torch.linspace(0, count - 1, min(count, SEARCH_POSITIONS)).round().long().unique()


def fit_family(family: str, ranked: Ranked, observed, tol: float) -> Fit:
    """The family's best temperature and parameter, rounded to the fewest significant digits that still fit.

    The search runs on at most SEARCH_POSITIONS evenly spaced positions; the fit is then judged on all of them."""
    subset = _search_positions(len(observed))
    temperature = _fit_temperature(family, ranked.subset(subset), observed[subset], tol)
    fitted = _exact(family, ranked, observed, temperature, tol)
    for digits in (1, 2, 3):
        rounded = _exact(family, ranked, observed, float(f"{temperature:.{digits}g}"), tol)
        if rounded[0] <= tol:
            fitted = rounded
            break
    residual, sampling, ranges, predicted = fitted
    name = [f"temperature {sampling.temperature:g}"]
    if sampling.top_k:
        name.append(f"top-k {sampling.top_k}")
    if sampling.top_p < 1:
        name.append(f"top-p {sampling.top_p:g}")
    return Fit(", ".join(name), "semantics", residual, predicted, sampling=sampling, ranges=ranges)


def semantics_fits(rows, targets, observed, tol: float) -> list[Fit]:
    """Temperature alone, with top-k, with top-p (each renormalised), and unnormalised logits. A truncation that
    changes no prediction by more than the tolerance is the temperature-only fit again, and is left out."""
    ranked = Ranked(rows, targets)
    temperature_only = fit_family("temperature", ranked, observed, tol)
    fits = [temperature_only]
    for family in ("top_k", "top_p"):
        fit = fit_family(family, ranked, observed, tol)
        if max_residual(fit.predicted, predict(rows, targets, Sampling(temperature=fit.sampling.temperature,
                                                                       logprobs="processed"))) > tol:
            fits.append(fit)
    fits.append(Fit("unnormalised logits", "semantics", max_residual(ranked.target, observed), ranked.target))
    return fits
