"""`rlparity routing --replay ...`: the router-replay variants side by side, against --b and the float64 reference.

The trainer (--a hf, in --a-dtype) runs each variant's log-prob and training passes over one batch of the held-out
sequences; each engine routes and scores every sequence alone. One record per (variant, engine).
"""

from rlparity.engines import EngineUnavailable
from rlparity.engines.base import process_versions
from rlparity.engines.process import EngineProcessError
from rlparity.results import ERROR, FAIL, ResultStore, default_results_path
from rlparity.routing.checks import engine_error_record
from rlparity.routing.engines import engine_routes, open_routing_engine
from rlparity.routing.variants import check, measure_variant, variant_table, weights_unknown
from rlparity.tally import EXIT_NOTHING_CHECKED

REFERENCE = ("reference", "float64")


def variants_of(choices: list[str]) -> list[str]:
    """The chosen variants in the order given, once each; 'ids' brings its reversed slot order along."""
    out = []
    for choice in choices:
        for variant in (choice, "ids-reversed") if choice == "ids" else (choice,):
            if variant not in out:
                out.append(variant)
    return out


def replay_command(args, checkpoint, sequences, shapes: dict) -> int:
    variants = variants_of(args.replay)
    sides = [(args.b, args.b_dtype)] + ([REFERENCE] if (args.b, args.b_dtype or "float64") != REFERENCE else [])
    trainer = open_routing_engine("hf", checkpoint, args.a_dtype, max_len=args.length, **dict(args.a_option))
    results, records, skipped = [], [], []
    try:
        for name, dtype in sides:
            options = dict(args.b_option) if name == args.b else {}
            try:
                engine = open_routing_engine(name, checkpoint, dtype, max_len=args.length, **options)
            except EngineUnavailable as exc:
                skipped.append(f"skipped {name}: {exc}")
                continue
            except EngineProcessError as exc:  # this engine's error record; the other sides go on
                records.append(engine_error_record("replay", f"{trainer.name} vs {name}", exc, shapes))
                continue
            try:
                routes = engine_routes(engine, sequences)
                logprobs = engine.logprobs(sequences, [1] * len(sequences))
                for variant in variants:
                    if reason := weights_unknown(engine.name, variant):
                        skipped.append(f"skipped {variant} against {engine.name}: {reason}")
                        continue
                    result = measure_variant(trainer.model, sequences, trainer.pad_id, variant, engine.name, routes,
                                             logprobs)
                    record = check(result, f"{trainer.name} vs {engine.name}",
                                   str(trainer.dtype).removeprefix("torch."), shapes)
                    record.engines = process_versions(engine)
                    results.append(result)
                    records.append(record)
            except EngineProcessError as exc:
                records.append(engine_error_record("replay", f"{trainer.name} vs {engine.name}", exc, shapes))
            finally:
                engine.close()
    finally:
        trainer.close()
    for line in skipped:
        print(line)
    if not records:
        print(f"nothing was checked for routing --replay {' '.join(args.replay)}")
        return EXIT_NOTHING_CHECKED
    print(f"router replay variants: trainer {trainer.name}, {len(sequences)} sequences of {args.length} tokens "
          f"(seed {args.seed}) as one mini-batch")
    if results:
        print("\n".join(variant_table(results)))
    store = ResultStore(args.results or default_results_path("routing"))
    for record in records:
        store.append(record)
        if record.verdict in (FAIL, ERROR):
            print(f"{record.property} {record.subject} [{record.case}]: {record.verdict} ({record.reason})")
    print(f"{store.count} records written to {store.path}")
    return 1 if any(record.verdict in (FAIL, ERROR) for record in records) else 0
