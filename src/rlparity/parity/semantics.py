"""Semantics preflight: before comparing numbers, check that trainer and engine mean the same thing.

    report = preflight(trainer, engine, batch, tolerance)
    report.ok                 False when a definitional mismatch was found
    print(*report.lines(), sep="\n")

Checks, each a Finding (ok / mismatch / numeric / skipped):
    tokenizer     both sides give ids the same tokens (rlparity.engines.require_same_tokenizers)
    round trip    the batch's ids survive decode -> encode with each side's tokenizer
    log-probs     per probe Sampling (raw, and processed at T = 0.7 where the engine offers it): the engine's values
                  against the trainer's full logits; when they differ by more than the tolerance, every hypothesis of
                  rlparity.parity.hypotheses is fitted and the one that fits is named with its closed-form effect.
                  A difference that none explains is reported as numeric: a case for `rlparity diff`.
    sampled       engines that sample (vLLM): tokens sampled at T = 0.7 and the log-probs the engine reports for them,
                  judged as the kind it labels them (raw or processed), the same way

The trainer must expose its logits (`hidden_states(ids)["logits"]`, the CaptureEngine protocol); the engine only
has to answer `logprobs`.
"""

from dataclasses import dataclass, field

import torch

from rlparity.engines.base import RAW, Sampling, captures, require_same_tokenizers
from rlparity.errors import RlparityError
from rlparity.parity.hypotheses import (
    Fit,
    Scored,
    alignment_fits,
    as_processed,
    max_residual,
    positions,
    predict,
    semantics_fits,
)
from rlparity.parity.tokens import round_trip_failures

# Teacher-forced probes: raw, and processed at a temperature where raw and processed differ. No top-k/top-p here:
# near the cut, tokens of nearly equal probability fall in or out with rounding (bf16 above all).
DEFAULT_PROBES = (RAW, Sampling(temperature=0.7, logprobs="processed"))
# The rollout probe, for engines that sample: tokens sampled at T = 0.7 from the first sequence's prompt.
SAMPLE_PROBE = Sampling(temperature=0.7)
SAMPLE_TOKENS = 16
SAMPLE_SEED = 0
OK, MISMATCH, NUMERIC, SKIPPED = "ok", "mismatch", "numeric", "skipped"


@dataclass
class Finding:
    check: str
    status: str
    message: str
    name: str = ""  # the mismatch, e.g. "temperature 0.7"
    effect: str = ""  # its closed form and size on this batch
    parameters: dict = field(default_factory=dict)  # the fitted hypothesis: temperature, top_k, top_p, shift, ...
    # The sampled probe's tokens (seed SAMPLE_SEED): two engine versions that score alike may still sample apart.
    sampled_tokens: list[int] = field(default_factory=list)


@dataclass
class PreflightReport:
    trainer: str
    engine: str
    tolerance: float
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def mismatches(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status == MISMATCH]

    def lines(self) -> list[str]:
        out = [f"semantics preflight: {self.trainer} (trainer) vs {self.engine} (engine), "
               f"tolerance {self.tolerance:.3g}"]
        for finding in self.findings:
            out.append(f"  [{finding.status}] {finding.check}: {finding.message}")
            if finding.effect:
                out.append(f"      effect: {finding.effect}")
        return out

    def summary(self) -> str:
        if self.ok:
            return "semantics agree"
        return "; ".join(f"{f.check}: {f.name or f.message}" for f in self.mismatches)


def describe(sampling: Sampling) -> str:
    if sampling.logprobs == "raw":
        return "raw"
    parts = [f"T={sampling.temperature:g}"]
    if sampling.top_k:
        parts.append(f"top_k={sampling.top_k}")
    if sampling.top_p < 1:
        parts.append(f"top_p={sampling.top_p:g}")
    return "processed " + ",".join(parts)


def trainer_scores(trainer, token_ids, prompt_len) -> Scored:
    if not captures(trainer):
        raise RlparityError(f"preflight: the trainer side {trainer.name} does not expose its logits "
                            f"(hidden_states); use an engine that does (hf, reference) as the trainer")
    logits = [trainer.hidden_states(ids)["logits"].double() for ids in token_ids]
    return Scored(logits, [torch.tensor(list(ids)) for ids in token_ids], list(prompt_len))


def check_tokenizers(trainer, engine) -> Finding:
    try:
        require_same_tokenizers(trainer, engine)
    except RlparityError as exc:
        return Finding("tokenizer", MISMATCH, str(exc), name="mismatched tokenizers")
    return Finding("tokenizer", OK, f"same ids -> tokens ({trainer.tokenizer.vocab_size} ids)")


def check_round_trip(trainer, engine, token_ids) -> Finding:
    sources = dict.fromkeys(side.tokenizer.source for side in (trainer, engine))
    problems = [f"{source}: {line}" for source in sources for line in round_trip_failures(source, token_ids)]
    if problems:
        return Finding("round trip", MISMATCH, "token ids change under decode -> encode: " + "; ".join(problems),
                       name="ids do not survive decode -> encode",
                       effect="a trainer that re-tokenizes the rollout's text scores other tokens than were sampled")
    return Finding("round trip", OK, f"all {len(token_ids)} sequences survive decode -> encode")


def _semantics_effect(fit: Fit, asked: Sampling) -> tuple[str, str]:
    """(what differs, its closed form) between the fitted distribution and the asked one."""
    got, want = fit.sampling, as_processed(asked)
    was_asked = (lambda text: f" where {text} was asked") if asked.logprobs == "processed" else (lambda text: "")
    parts, forms = [], []
    if asked.logprobs == "raw":
        parts.append("processed log-probs where raw ones were asked")
    elif (got.temperature, got.top_k, got.top_p) == (1.0, 0, 1.0):
        parts.append(f"raw log-probs where {describe(asked)} ones were asked")
    if got.temperature != want.temperature:
        parts.append(f"temperature {got.temperature:g}" + was_asked(f"{want.temperature:g}"))
        forms.append("logits divided by T: log p_T(x) = z_x/T - logsumexp(z/T)")
    if got.top_k != want.top_k:
        if got.top_k:
            span = fit.ranges.get("top_k")
            fits_too = f" (any k in {span[0]}..{span[1]} fits)" if span and span[0] != span[1] else ""
            parts.append(f"top-k {got.top_k}{fits_too} renormalised" + was_asked(f"top-k {want.top_k or 'off'}"))
            forms.append("top-k renormalisation: kept tokens shift by -log S, S the mass of the k most probable; "
                         "the others are -inf")
        else:
            parts.append(f"top-k {want.top_k} not applied, or not renormalised")
            forms.append("the asked distribution is higher by -log S on kept tokens (S the kept mass)")
    if got.top_p != want.top_p:
        if got.top_p < 1:
            parts.append(f"top-p {got.top_p:g} renormalised" + was_asked(f"top-p {want.top_p:g}"))
            forms.append("top-p renormalisation: kept tokens shift by -log S, S >= p the mass of the smallest most "
                         "probable set reaching p; the others are -inf")
        else:
            parts.append(f"top-p {want.top_p:g} not applied, or not renormalised")
            forms.append("the asked distribution is higher by -log S on kept tokens (S the kept mass)")
    return "; ".join(parts), "; ".join(forms)


def _explain(fit: Fit, asked: Sampling) -> tuple[str, str]:
    if fit.name == "unnormalised logits":
        return "unnormalised logits where log-probs were asked", "value = z_x, higher than log p(x) by logsumexp(z)"
    if fit.kind == "semantics":
        return _semantics_effect(fit, asked)
    where = "t = prompt_len + j" + (f" {'+' if fit.shift > 0 else '-'} {abs(fit.shift)}" if fit.shift else "")
    if fit.unshifted:
        what = (f"the logits at position t are scored against token t itself ({where}): the next-token shift is "
                "missing, so each value is the log-prob of the token just read")
        return what, "value j = log p(x_t | x_<=t) instead of log p(x_t | x_<t)"
    early = "early (the last prompt token is scored as a response token)" if fit.shift < 0 else "late"
    tokens = "token" if abs(fit.shift) == 1 else "tokens"
    what = f"the response window is off by {fit.shift:+d}: it starts {abs(fit.shift)} {tokens} {early}"
    return what, f"value j = log p(x_t | x_<t) at {where}: each value is another token's, {abs(fit.shift)} away"


def _effect_numbers(fit: Fit, expected: torch.Tensor | None, observed: torch.Tensor, tolerance: float) -> str:
    if expected is None or expected.shape != fit.predicted.shape:
        return f"the hypothesis reproduces the engine's values to {fit.residual:.2g} (tolerance {tolerance:.2g})"
    finite = torch.isfinite(fit.predicted) & torch.isfinite(expected) & torch.isfinite(observed)
    predicted, seen = (fit.predicted - expected)[finite], (observed - expected)[finite]
    dropped = int((~torch.isfinite(fit.predicted)).sum())
    text = (f"on this batch the predicted shift is {predicted.mean():+.3g} on average (from {predicted.min():+.3g} to "
            f"{predicted.max():+.3g}), the observed {seen.mean():+.3g} (from {seen.min():+.3g} to {seen.max():+.3g}); "
            f"the hypothesis reproduces the engine's values to {fit.residual:.2g} (tolerance {tolerance:.2g})")
    return text + (f"; {dropped} teacher-forced tokens fall outside the kept set (-inf)" if dropped else "")


def fit_parameters(fit: Fit) -> dict:
    parameters = {"kind": fit.kind, "residual": fit.residual}
    if fit.sampling is not None:
        parameters |= {"temperature": fit.sampling.temperature, "top_k": fit.sampling.top_k,
                       "top_p": fit.sampling.top_p, "ranges": fit.ranges}
    if fit.kind == "alignment":
        parameters |= {"shift": fit.shift, "unshifted": fit.unshifted}
    return parameters


def check_logprobs(scored: Scored, engine, token_ids, prompt_len, asked: Sampling, tolerance: float,
                   diff_command: str) -> Finding:
    check = f"log-probs [{describe(asked)}]"
    try:
        values = engine.logprobs(token_ids, prompt_len, asked)
    except RlparityError as exc:
        return Finding(check, SKIPPED, f"the engine does not offer them: {exc}")
    return judge_values(check, engine.name, scored, values, asked, tolerance, diff_command)


def check_sampled(trainer, engine, prompt: list[int], tolerance: float, diff_command: str) -> Finding | None:
    """The rollout path: tokens the engine samples at SAMPLE_PROBE's temperature, with the log-probs it reports for
    them (of the kind it labels them with), against the trainer on the same tokens. None for engines that do not
    sample (VllmEngine.sample's interface)."""
    if not callable(getattr(engine, "sample", None)):
        return None
    kind = getattr(engine, "logprobs_mode", "raw")
    asked = Sampling(temperature=SAMPLE_PROBE.temperature, logprobs=kind)
    check = f"sampled log-probs [{describe(asked)}]"
    try:
        sampled = engine.sample(prompt, asked, max_tokens=SAMPLE_TOKENS, seed=SAMPLE_SEED, ignore_eos=True)
    except RlparityError as exc:
        return Finding(check, SKIPPED, f"the engine cannot sample here: {exc}")
    asked = Sampling(temperature=SAMPLE_PROBE.temperature, logprobs=sampled.logprobs_kind)
    scored = trainer_scores(trainer, [list(prompt) + list(sampled.token_ids)], [len(prompt)])
    finding = judge_values(check, engine.name, scored, [sampled.logprobs], asked, tolerance, diff_command)
    finding.sampled_tokens = [int(token) for token in sampled.token_ids]
    return finding


def judge_values(check: str, engine_name: str, scored: Scored, values: list[torch.Tensor], asked: Sampling,
                 tolerance: float, diff_command: str) -> Finding:
    """An engine's values for `asked` against the trainer's logits: ok, the named mismatch that fits, or numeric."""
    observed = torch.cat([v.double().reshape(-1) for v in values])
    lengths = [len(v) for v in values]
    expected = None
    if lengths == scored.response_lengths:
        rows, targets = positions(scored, lengths)
        expected = predict(rows, targets, asked)
        residual = max_residual(expected, observed)
        if residual <= tolerance:
            return Finding(check, OK, f"{engine_name} returns what was asked: max difference {residual:.3g}")
        fits = semantics_fits(rows, targets, observed, tolerance) + alignment_fits(scored, lengths, observed, asked)
        what_differs = f"differ by up to {residual:.3g} (tolerance {tolerance:.3g})"
    else:
        fits = alignment_fits(scored, lengths, observed, asked)
        what_differs = (f"come in {lengths} values per sequence where the responses have {scored.response_lengths}")
    fitting = [fit for fit in fits if fit.residual <= tolerance]
    if fitting:
        fit = fitting[0]
        what, form = _explain(fit, asked)
        others = [f.name for f in fitting[1:]]
        also = f" (also consistent: {', '.join(others)})" if others else ""
        return Finding(check, MISMATCH, f"{engine_name}'s log-probs {what_differs}: {what}{also}", name=fit.name,
                       effect=f"{form}; {_effect_numbers(fit, expected, observed, tolerance)}",
                       parameters=fit_parameters(fit))
    closest = min(fits, key=lambda f: f.residual, default=None)
    hint = f"; the closest hypothesis ({closest.name}) leaves {closest.residual:.3g}" if closest else ""
    return Finding(check, NUMERIC, f"{engine_name}'s log-probs {what_differs} and no definitional difference explains "
                                   f"it{hint}: a numerical difference; find the first diverging layer with "
                                   f"`{diff_command}`", name="unexplained")


def preflight(trainer, engine, batch, tolerance: float, probes=DEFAULT_PROBES,
              diff_command: str = "rlparity diff --a TRAINER --b ENGINE") -> PreflightReport:
    """`batch` has token_ids and prompt_len (a ParityBatch); `tolerance` bounds |difference| of agreeing log-probs;
    `diff_command` is suggested when the numbers differ for no definitional reason."""
    findings = [check_tokenizers(trainer, engine), check_round_trip(trainer, engine, batch.token_ids)]
    scored = trainer_scores(trainer, batch.token_ids, batch.prompt_len)
    for asked in probes:
        findings.append(check_logprobs(scored, engine, batch.token_ids, batch.prompt_len, asked, tolerance,
                                       diff_command))
    prompt = batch.token_ids[0][: batch.prompt_len[0]]
    sampled = check_sampled(trainer, engine, prompt, tolerance, diff_command)
    if sampled is not None:
        findings.append(sampled)
    return PreflightReport(trainer.name, engine.name, tolerance, findings)
