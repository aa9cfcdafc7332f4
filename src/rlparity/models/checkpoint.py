"""Opening a GPT-OSS checkpoint folder, with every problem found at the boundary and named.

A checkpoint is a folder with config.json (GPT-OSS-like), the weights as safetensors (one file or an
index), and tokenizer.json. Opening it checks the config, the tensor names and shapes against the
config (from the safetensors headers, without reading the tensors), and that the tokenizer fits the
model: its ids fit in vocab_size and the config's eos/pad ids are the tokenizer's eos/pad tokens.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from rlparity.errors import RlparityError
from rlparity.models.config import normalise
from rlparity.models.tokenizer_info import TokenizerInfo, tokenizer_info

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
BUILD_HINT = ("expected a GPT-OSS checkpoint folder, or a bundled model's: `python -m rlparity.models build tiny` "
              "prints its folder")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """transformers' GptOssForCausalLM parameter names and shapes for `config`."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads_q, heads_kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    experts, inner = config["num_local_experts"], config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    q_dim, kv_dim = heads_q * head_dim, heads_kv * head_dim
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q_dim, hidden), f"{p}.self_attn.q_proj.bias": (q_dim,),
            f"{p}.self_attn.k_proj.weight": (kv_dim, hidden), f"{p}.self_attn.k_proj.bias": (kv_dim,),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden), f"{p}.self_attn.v_proj.bias": (kv_dim,),
            f"{p}.self_attn.o_proj.weight": (hidden, q_dim), f"{p}.self_attn.o_proj.bias": (hidden,),
            f"{p}.self_attn.sinks": (heads_q,),
            f"{p}.mlp.router.weight": (experts, hidden), f"{p}.mlp.router.bias": (experts,),
            f"{p}.mlp.experts.gate_up_proj": (experts, hidden, 2 * inner),
            f"{p}.mlp.experts.gate_up_proj_bias": (experts, 2 * inner),
            f"{p}.mlp.experts.down_proj": (experts, inner, hidden),
            f"{p}.mlp.experts.down_proj_bias": (experts, hidden),
        }
    return shapes


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors header (the tensors are not read)."""
    if not file.is_file():
        raise RlparityError(f"weights file {file} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise RlparityError(f"weights file {file} is not readable safetensors ({type(exc).__name__}: {exc})") from exc


def weight_shapes(path: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """(tensor name -> the safetensors file holding it, tensor name -> shape)."""
    if (path / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
    else:
        files = dict.fromkeys(header_shapes(path / SINGLE_WEIGHTS), path / SINGLE_WEIGHTS)
    shapes = {}
    for file in sorted(set(files.values())):
        shapes |= header_shapes(file)
    return files, shapes


def check_weights(path: Path, config: dict) -> dict[str, Path]:
    files, shapes = weight_shapes(path)
    expected = expected_shapes(config)
    problems = []
    if missing := sorted(set(expected) - set(shapes)):
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected := sorted(set(shapes) - set(expected)):
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                        f"(quantised checkpoints, e.g. MXFP4 *_blocks/*_scales, are not supported)")
    for name, shape in shapes.items():
        if name in expected and shape != expected[name]:
            problems.append(f"{name} has shape {shape}, the config implies {expected[name]}")
    if problems:
        raise RlparityError(f"weights in {path} do not match its config.json: " + "; ".join(problems))
    return files


def check_tokenizer(config: dict, tokenizer: TokenizerInfo, path: Path) -> None:
    problems = []
    if tokenizer.vocab_size > config["vocab_size"]:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                        f"{config['vocab_size']}")
    for key, token in (("eos_token_id", tokenizer.eos_token), ("pad_token_id", tokenizer.pad_token)):
        config_id = config.get(key)
        if config_id is None or token is None:
            continue
        config_ids = config_id if isinstance(config_id, list) else [config_id]
        if tokenizer.token_to_id.get(token) not in config_ids:
            names = [tokenizer.tokens[i] if 0 <= i < tokenizer.vocab_size else "<out of range>" for i in config_ids]
            problems.append(f"config {key} is {config_id} ({names}), but the tokenizer's {key[:-3]} is {token!r} "
                            f"(id {tokenizer.token_to_id.get(token)})")
    if problems:
        raise RlparityError(f"the tokenizer in {path} does not belong to the model there (mismatched tokenizer): "
                            + "; ".join(problems))


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict  # normalised: RoPE as rope_theta + rope_scaling, GPT-OSS defaults filled in
    tokenizer: TokenizerInfo
    files: dict[str, Path]  # tensor name -> safetensors file

    @property
    def max_position_embeddings(self) -> int:
        return self.config["max_position_embeddings"]

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {}
        for file in sorted(set(self.files.values())):
            with safe_open(str(file), framework="pt") as handle:
                tensors |= {name: handle.get_tensor(name).to(dtype) for name in handle.keys()}
        return tensors


def open_checkpoint(path: Path | str, tokenizer_path: Path | str | None = None) -> Checkpoint:
    """Checks the folder (and a tokenizer from elsewhere, if given) and returns what it holds."""
    path = Path(path)
    if not path.is_dir():
        raise RlparityError(f"checkpoint {path} does not exist or is not a folder; {BUILD_HINT}")
    required = ["config.json"] + ([] if tokenizer_path else ["tokenizer.json"])
    if missing := [name for name in required if not (path / name).is_file()]:
        raise RlparityError(f"checkpoint {path} has no {', '.join(missing)}; expected a Hugging Face checkpoint "
                            f"folder (config.json, {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}, tokenizer.json)")
    if not (path / SINGLE_WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
        raise RlparityError(f"checkpoint {path} has no weights: expected {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise RlparityError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    config = normalise(raw, str(path / "config.json"))
    files = check_weights(path, config)
    tokenizer = tokenizer_info(Path(tokenizer_path) if tokenizer_path else path)
    check_tokenizer(config, tokenizer, path if tokenizer_path is None else Path(tokenizer_path))
    return Checkpoint(path=path, config=config, tokenizer=tokenizer, files=files)
