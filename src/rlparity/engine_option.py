"""The --engine option, spelled the same way on every command that takes engines.

    add_engine_argument(parser)          # --engine NAME=module:Class, repeatable
    register_engines(args.engine)        # in the command, before its sides are parsed

Only the standard library is imported here: adding the option to a command line is free (rlparity.engines, and
torch with it, load when the command runs).
"""

import argparse

ENGINE_HELP = ("your engine: a class with the rlparity.engines protocol (logprobs; optionally routing, "
               "hidden_states), registered under NAME and then usable as a side, e.g. --engine "
               "mine=my_engine:MyEngine --b mine:float32 (repeatable; module is looked up from the current "
               "directory first)")


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=module:Class", help=ENGINE_HELP)


def register_engines(specs: list[str]) -> list[str]:
    """Registers each --engine spec (rlparity.engines.register_user_engine) and returns the names."""
    if not specs:
        return []
    from rlparity.engines import register_user_engine

    return [register_user_engine(spec) for spec in specs]
