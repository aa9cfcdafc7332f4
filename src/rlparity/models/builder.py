"""Builds a bundled model into a Hugging Face checkpoint folder.

    config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, model.safetensors

The folder loads with `GptOssForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, and is
what vLLM is pointed at. The build record (losses, time, statistics, environment) is returned for
the cache to write into its manifest.
"""

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlparity.errors import RlparityError
from rlparity.models.config import normalise
from rlparity.models.language import EOS, PAD, Language
from rlparity.models.recipe import language_of
from rlparity.models.specs import ModelSpec
from rlparity.models.stats import model_statistics
from rlparity.models.tokenizer import write_tokenizer
from rlparity.models.train import deterministic_cpu, init_parameters, train

WEIGHTS_FILE = "model.safetensors"
STATS_SEQUENCES = 8  # held-out sequences the statistics are measured on


def check_special_ids(spec: ModelSpec, language: Language) -> None:
    for key, token in (("pad_token_id", PAD), ("eos_token_id", EOS)):
        if spec.config.get(key) != language.ids[token]:
            raise RlparityError(f"model spec {spec.name!r}: config {key} is {spec.config.get(key)!r}, "
                                f"but the tokenizer gives {token} id {language.ids[token]}")


def cpu_model() -> str:
    """Vendor, family, model and name of the CPU: BLAS libraries pick kernels by these, not only by ISA."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}: "
            f"{fields.get('model name', '?')}")


def build_environment() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model()}


def new_model(folder: Path) -> torch.nn.Module:
    """An untrained GptOssForCausalLM from the folder's config.json, eager attention and experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager",
                                            dtype=torch.float32)


def build(spec: ModelSpec, folder: Path, log: Callable[[str], None] = print) -> dict:
    """Writes the checkpoint into `folder` (created, must not exist) and returns the build record."""
    start = time.monotonic()
    language = language_of(spec)
    check_special_ids(spec, language)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.config, indent=2) + "\n")
    write_tokenizer(language.tokens, folder, spec.config["max_position_embeddings"])

    recipe = spec.training
    with deterministic_cpu():
        model = new_model(folder)
        init_parameters(model, recipe.seed)
        losses = train(model, language, recipe, log=log)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    build_seconds = time.monotonic() - start

    held_out = torch.tensor(next(language.batches(recipe.eval_seed, STATS_SEQUENCES, recipe.seq_len)))
    stats = model_statistics(normalise(spec.config, spec.name), {k: v.double() for k, v in weights.items()}, held_out)
    return {
        "train_losses": {"first": losses[0], "last": losses[-1], "min": min(losses)},
        "build_seconds": round(build_seconds, 1),
        "statistics": stats,
        "environment": build_environment(),
    }
