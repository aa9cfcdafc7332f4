"""rlparity diff: where two engines' activations first diverge, on the same tokens.

    rlparity diff --a hf --b vllm [--model tiny | --checkpoint DIR] [--dtype float32] [--tokens 96]
    rlparity diff --a hf:bf16 --b vllm:bf16 --b-option 'hf_overrides={"sliding_window": null}'

Each side runs one prefill over the same tokens and returns the activations named by
rlparity.engines.base.capture_points (embed; per layer attn, mlp and the residual stream; norm; logits).
What is captured on each engine, and how:

    hf         forward hooks on transformers' modules, in this process: embed_tokens; per decoder layer
               self_attn (output[0]: after o_proj, before the residual add), mlp (output[0]: the experts'
               weighted sum, before the residual add) and the layer's output (the residual stream);
               model.norm; lm_head (the logits)
    reference  the activations rlparity.reference.gpt_oss.forward computes explicitly, under the same names
    vllm       forward hooks on vLLM's own GPT-OSS modules inside the engine process, during one prefill
               (rlparity.engines.vllm_capture): embedding; OAIAttention; MLPBlock; the residual stream summed
               in float32 from the (mlp, residual) pair vLLM's blocks return unsummed; GptOssModel.norm; the
               logits from vLLM's LM head and logits processor applied to the captured norm output
When both sides report routing, the MoE rows also count tokens sent to a different set of experts.

The table gives each point's relative error ||a - b|| / ||b||, its noise floor (the plain reference in the
comparison's dtype against float64, same tokens), their ratio to the threshold, and the first token above it;
the last line names the first point above its floor and what fits (e.g. a sliding window ignored). Your engine is a
side too: --engine mine=my_engine:MyEngine --b mine (it needs hidden_states). Exit status: 0 when nothing is above
its floor, 1 when a point is, 2 on bad input, 3 when nothing could be compared (an engine cannot run here).
"""

import argparse
import json
from dataclasses import asdict

# Only the standard library is imported until the command runs: adding this parser to a command line is free.
from rlparity.engine_option import add_engine_argument, register_engines
from rlparity.model_option import add_model_arguments, model_source
from rlparity.tally import EXIT_NOTHING_CHECKED

# Enough tokens to pass the bundled models' sliding windows (tiny: 32, micro: 8) three times.
DIFF_TOKENS = 96
# The engines' max length: room for the tokens; vLLM sizes its KV cache by it.
MIN_ENGINE_MAX_LEN = 256
PROPERTY = "logprob_parity.first_diverging_layer"


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE as JSON (a plain string when it is not JSON)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with VALUE as JSON, e.g. hf_overrides='{{\"sliding_window\": null}}', got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_diff_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `diff` to a command line's subparsers; its `run` default is run_diff(args) -> exit status."""
    parser = subparsers.add_parser("diff", help="the first layer where two engines' activations diverge",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, metavar="ENGINE[:DTYPE]", help="one side, e.g. hf or hf:bf16 "
                        "(engines: hf, reference, vllm, and any registered in rlparity.engines)")
    parser.add_argument("--b", required=True, metavar="ENGINE[:DTYPE]", help="the other side, e.g. vllm or "
                        "reference:float64")
    parser.add_argument("--dtype", default="float32", help="dtype of a side given without one (default float32)")
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=DIFF_TOKENS, help=f"sequence length (default {DIFF_TOKENS})")
    parser.add_argument("--seed", type=int, default=None, help="seed of a bundled model's token sequence (default: "
                        "the parity batch's); a checkpoint's tokens are the longest text of its parity prompt set")
    parser.add_argument("--a-option", action="append", type=parse_option, default=[], metavar="KEY=JSON",
                        help="constructor option of side a (repeatable), e.g. attn_implementation=\"eager\"")
    parser.add_argument("--b-option", action="append", type=parse_option, default=[], metavar="KEY=JSON",
                        help="constructor option of side b, e.g. hf_overrides='{\"sliding_window\": null}'")
    parser.add_argument("--results", default=None, help="JSON-lines results file (default results/diff-<time>.jsonl)")
    add_engine_argument(parser)
    parser.set_defaults(run=run_diff)
    return parser


def diff_tokens(source, length: int, seed: int) -> tuple[list[int], str]:
    """(tokens, where they come from): a bundled model's synthetic language from `seed`, or the longest sequence of
    a checkpoint's parity batch (the prompt set in its own tokenizer), cut to `length`."""
    from rlparity.errors import RlparityError
    from rlparity.parity.batch import language_tokens, parity_batch

    if source.checkpoint is None:
        return language_tokens(source.name, seed, [length])[0], f"seed{seed}"
    batch = parity_batch(source)
    longest = max(batch.token_ids, key=len)
    if len(longest) < length:
        raise RlparityError(f"--tokens {length}: the longest text of the parity prompt set is {len(longest)} tokens "
                            f"in the tokenizer of {source.checkpoint}; ask for at most {len(longest)}")
    return longest[:length], batch.prompts


def run_diff(args: argparse.Namespace) -> int:
    """Prints the table; exit status 0 when no point is above its floor, 1 when one is, 3 when an engine cannot run
    here. Bad input raises RlparityError (the caller prints it and exits 2)."""
    from rlparity.engines.base import process_versions
    from rlparity.errors import RlparityError
    from rlparity.parity.batch import PARITY_SEED
    from rlparity.parity.diff import diff_sides
    from rlparity.parity.sides import EngineFailed, EnginePool, EngineUnavailable, Side
    from rlparity.results import ERROR, FAIL, PASS, Record, ResultStore, default_results_path

    if args.tokens < 2:
        raise RlparityError(f"--tokens must be at least 2, got {args.tokens}")
    seed = PARITY_SEED if args.seed is None else args.seed
    register_engines(args.engine)
    a = Side.parse(args.a, args.dtype, dict(args.a_option))
    b = Side.parse(args.b, args.dtype, dict(args.b_option))
    source = model_source(args)
    source.check_side_tokenizers((a, b))
    tokens, origin = diff_tokens(source, args.tokens, seed)
    checkpoint = source.folder()
    # room for the tokens, within what the model (and vLLM, one token short of it) accepts
    max_len = min(max(MIN_ENGINE_MAX_LEN, args.tokens), source.config()["max_position_embeddings"] - 1)
    store = ResultStore(args.results or default_results_path("diff"))
    subject, case = f"{a.label} vs {b.label}", f"{source.label}:{len(tokens)}tok:{origin}"
    with EnginePool(checkpoint, max_len=max_len) as pool:
        try:
            report = diff_sides(pool, a, b, tokens)
            versions = process_versions(pool.get(a), pool.get(b))
        except EngineUnavailable as exc:
            print(f"skipped: {exc}\nnothing was checked for {a.label} vs {b.label}")
            return EXIT_NOTHING_CHECKED
        except EngineFailed as exc:
            if isinstance(exc.__cause__, RlparityError):  # an engine refused its input: exit status 2
                raise RlparityError(str(exc)) from exc
            # an engine failed to start or died: the check's error record, exit status 1
            print(f"{subject}: error ({exc})")
            store.append(Record(property=PROPERTY, subject=subject, case=case, dtype="", verdict=ERROR,
                                reason=str(exc), shapes={"tokens": len(tokens)}))
            print(f"{store.count} records written to {store.path}")
            return 1
    print("\n".join(report.table()))
    store.append(Record(property=PROPERTY, subject=subject, case=case, dtype=report.floor_dtype,
                        verdict=FAIL if report.first else PASS,
                        error=max(point.ratio for point in report.points), tolerance=1.0, reason=report.hint,
                        shapes={"tokens": len(tokens)}, extra={"points": [asdict(p) for p in report.points]},
                        engines=versions))
    return 1 if report.first else 0
