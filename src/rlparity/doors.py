"""The one resolver of the doors through which a user's component enters a check.

Every door (attention kernel, sequence-parallel attention, engine) takes either a name rlparity
registered or an import path "module:attr" (attr may be dotted: "module:Class.method"). The module
is looked up as `python -m` would: the current directory comes first, so a user's file next to
where they run the command is importable.
"""

import importlib
import os
import sys

from rlparity.errors import RlparityError


def resolve(target: str, what: str):
    """The object at `target` ("module:attr"); `what` names the door in the error, e.g. "attention backend"."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RlparityError(f"{what} {target!r}: expected 'module:attr' "
                            "(e.g. 'mypkg.kernels:attend' or 'mypkg.engine:MyEngine')")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RlparityError(
            f"{what} {target!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    value = module
    for part in attr.split("."):
        if not hasattr(value, part):
            raise RlparityError(f"{what} {target!r}: module {module_name!r} has no attribute {attr!r}")
        value = getattr(value, part)
    return value


def resolve_callable(target: str, what: str):
    value = resolve(target, what)
    if not callable(value):
        raise RlparityError(f"{what} {target!r}: {type(value).__name__} is not callable")
    return value
