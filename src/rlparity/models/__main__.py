"""python -m rlparity.models {list, build, path, stats, record} [name]

build   build (if not cached) and verify; prints the checkpoint folder (the statistics go to stderr)
path    the checkpoint folder alone (built if needed), for scripts: MODEL=$(python -m rlparity.models path tiny)
stats   the statistics recorded when the cached model was built (--json for the full record)
record  build and write the recipe and weights hashes into fixtures/models/hashes.json (maintainers)
"""

import argparse
import json
import sys

from rlparity.errors import RlparityError
from rlparity.models.cache import cached_model, ensure_model, record_hashes
from rlparity.models.specs import load_spec, model_names
from rlparity.models.stats import summary_lines

COMMANDS = ("list", "build", "path", "stats", "record")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=COMMANDS)
    parser.add_argument("name", nargs="?", default="tiny", help="a bundled model (default: tiny)")
    parser.add_argument("--cache", help="cache folder (default: $RLPARITY_CACHE or ~/.cache/rlparity)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a verified build is cached")
    parser.add_argument("--json", action="store_true", help="stats as JSON")


def run(args: argparse.Namespace) -> int:
    """Raises RlparityError on bad input; returns the exit status otherwise."""
    if args.action == "list":
        for name in model_names():
            print(f"{name:8s} {load_spec(name).description}")
        return 0
    if args.action == "record":
        folder, manifest = cached_model(args.name, cache_dir=args.cache, force=args.force, log=log)
        log(f"recorded {args.name!r} in {record_hashes(args.name, manifest)}")
        print(folder)
        return 0
    folder = ensure_model(args.name, cache_dir=args.cache, force=args.force, log=log)
    if args.action == "path":
        print(folder)
        return 0
    _, manifest = cached_model(args.name, cache_dir=args.cache, log=log)
    if args.action == "stats" and args.json:
        print(json.dumps(manifest["statistics"], indent=2))
        return 0
    report = print if args.action == "stats" else log
    report(f"built in {manifest['build_seconds']}s on {manifest['environment']['cpu_model']}")
    report("\n".join(summary_lines(manifest["statistics"])))
    if args.action == "build":
        print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlparity.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except RlparityError as exc:
        log(f"rlparity: error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
