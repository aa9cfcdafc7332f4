"""The model a command runs on, spelled the same way on every command that takes one:

    --model NAME       a bundled model of fixtures/models (micro, tiny), built and cached on first use
    --checkpoint DIR   your GPT-OSS checkpoint folder: config.json, safetensors, tokenizer.json

    add_model_arguments(parser)     # the two options, mutually exclusive
    source = model_source(args)     # a ModelSource; a --checkpoint folder is checked here (one-line error)
    source.folder()                 # the checkpoint folder (a bundled model is built on first use)

Only the standard library is imported here: adding the options to a command line is free (rlparity.models, and
torch with it, load when the command runs).
"""

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_HELP = ("your GPT-OSS checkpoint folder instead of a bundled model: config.json (model_type gpt_oss), "
                   "model.safetensors or model.safetensors.index.json with its shards, tokenizer.json")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSource:
    """A bundled model by name, or the user's checkpoint folder (absolute, already checked)."""

    name: str | None = None
    checkpoint: Path | None = None

    @property
    def label(self) -> str:
        return self.name if self.checkpoint is None else f"checkpoint:{self.checkpoint.name}"

    @property
    def argument(self) -> str:
        """How a command line names this model, for the commands rlparity prints (calibrate, diff)."""
        if self.checkpoint is None:
            return f"--model {self.name}"
        return f"--checkpoint {shlex.quote(str(self.checkpoint))}"

    def folder(self, log=_log) -> Path:
        """The checkpoint folder; a bundled model is built (and verified) on first use."""
        if self.checkpoint is not None:
            return self.checkpoint
        from rlparity.models import ensure_model

        return ensure_model(self.name, log=log)

    def config(self) -> dict:
        """The normalised config.json (a bundled model's from its spec: nothing is built)."""
        from rlparity.models import checkpoint_config, load_spec
        from rlparity.models.config import normalise

        if self.checkpoint is not None:
            return checkpoint_config(self.checkpoint)
        return normalise(load_spec(self.name).config, self.name)

    def check_side_tokenizers(self, sides, log=_log) -> None:
        """Each side (a parity Side) reads the folder's tokenizer unless its `tokenizer` option names another: all
        must give token ids the same meaning, else a one-line RlparityError names the first id that differs."""
        from rlparity.models.user import require_same_side_tokenizers

        require_same_side_tokenizers(self.folder(log), {side.label: side.constructor_options.get("tokenizer")
                                                        for side in sides})


def user_checkpoint(folder: Path | str) -> ModelSource:
    """The user's folder, checked as a whole (rlparity.models.validate_checkpoint)."""
    from rlparity.models import validate_checkpoint

    return ModelSource(checkpoint=validate_checkpoint(folder))


def as_source(model: "ModelSource | str") -> ModelSource:
    """A bundled model's name as a ModelSource; a ModelSource as it is."""
    return model if isinstance(model, ModelSource) else ModelSource(name=model)


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = "tiny",
                        model_help: str | None = None) -> None:
    """--model NAME | --checkpoint DIR; with default None one of them is required."""
    group = parser.add_mutually_exclusive_group(required=default is None)
    group.add_argument("--model", default=None, metavar="NAME", help=model_help or (
        "a bundled model (micro, tiny), built and cached on first use" + (f" (default {default})" if default else "")))
    group.add_argument("--checkpoint", default=None, metavar="DIR", help=CHECKPOINT_HELP)
    parser.set_defaults(model_default=default)


def add_checkpoint_argument(parser: argparse.ArgumentParser, help: str = CHECKPOINT_HELP) -> None:
    """--checkpoint DIR alone, for a command whose --model means something else (the trainer's task language)."""
    parser.add_argument("--checkpoint", default=None, metavar="DIR", help=help)


def model_source(args: argparse.Namespace) -> ModelSource:
    """The model the parsed arguments name. --model also takes a checkpoint folder (as --checkpoint does)."""
    from rlparity.errors import RlparityError
    from rlparity.models import model_names

    if args.checkpoint is not None:
        return user_checkpoint(args.checkpoint)
    name = args.model or getattr(args, "model_default", None) or "tiny"
    if name in model_names():
        return ModelSource(name=name)
    if Path(name).is_dir() and (Path(name) / "config.json").is_file():
        return user_checkpoint(name)
    raise RlparityError(f"--model {name!r} is neither a bundled model ({', '.join(model_names())}) nor a checkpoint "
                        f"folder with a config.json; give your folder as --checkpoint DIR")
