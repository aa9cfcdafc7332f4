"""The RL trainer's starting policy: a bundled model briefly fine-tuned on worked episodes of the tool task.

RL on a pretrained model starts from a policy that already follows the format now and then; the
bundled models have never seen a tool call, so a short supervised run on solved episodes (the calls a
task needs, their observations, the answer) gives them that. It is a fixture build step like the
models' own: deterministic (one thread, deterministic kernels, seeded data), cached by a hash of the
recipe and the base model's folder, built once and reused, and verified on every use like the models' cache
(rlparity.models.cache: staging folder, file lock, every file's sha256 in the manifest):

    python -m rlparity.trainer.sft tiny        # prints the folder
    sft_checkpoint("tiny") -> Path

The loss is on agent tokens only, as in RL; prompt and observation tokens are context.
"""

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

from rlparity.engines.base import right_pad
from rlparity.errors import RlparityError
from rlparity.models.cache import cache_root, check_files, ensure_model, file_hashes, read_manifest, staging_folder
from rlparity.models.recipe import language_of
from rlparity.models.specs import load_spec
from rlparity.models.train import deterministic_cpu
from rlparity.trainer.env import (
    Task,
    ToolEnvironment,
    call_tokens,
    final_tokens,
    prompt_tokens,
    sample_task,
)
from rlparity.trainer.policy import load_policy

SFT_VERSION = 3  # bump when the data, the training code or the manifest below changes
MANIFEST = "rlparity-sft.json"
LOCK_TIMEOUT_S = 1800


@dataclass(frozen=True)
class SftRecipe:
    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0


# Measured on the 2-core development machine (tiny): 60 steps take ~30 s and leave a policy that follows the
# format on most episodes but answers only some correctly (reward ~0.2-0.4), so RL has something to improve.
DEFAULT_RECIPE = SftRecipe()


def solved_episode(env: ToolEnvironment, task: Task) -> tuple[list[str], list[bool]]:
    """(tokens, agent mask) of the episode that solves `task` with its tools."""
    tokens = prompt_tokens(task)
    mask = [False] * len(tokens)
    for tool, arguments in task.calls:
        turn = call_tokens(tool, arguments)
        observation = env.step(turn).observation
        tokens += turn + observation
        mask += [True] * len(turn) + [False] * len(observation)
    turn = final_tokens(task.answer)
    return tokens + turn, mask + [True] * len(turn)


def sft_loss(model: torch.nn.Module, sequences: list[list[int]], masks: list[list[bool]], pad_id: int) -> torch.Tensor:
    ids, attention = right_pad(sequences, pad_id)
    trained = torch.zeros_like(ids, dtype=torch.bool)
    for row, mask in enumerate(masks):
        trained[row, : len(mask)] = torch.tensor(mask)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # position t predicts t + 1
    targets = trained[:, 1:]
    return torch.nn.functional.cross_entropy(logits[targets], ids[:, 1:][targets])


def fine_tune(model: torch.nn.Module, env: ToolEnvironment, recipe: SftRecipe, pad_id: int,
              log: Callable[[str], None] = print) -> list[float]:
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(recipe.steps):
        episodes = [solved_episode(env, sample_task(env.language, rng)) for _ in range(recipe.batch)]
        loss = sft_loss(model, [env.ids(tokens) for tokens, _ in episodes], [mask for _, mask in episodes], pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == recipe.steps - 1:
            log(f"sft step {step:3d}/{recipe.steps}  loss {losses[-1]:.3f}")
    model.eval()
    return losses


def recipe_key(base: str, base_folder: Path, recipe: SftRecipe) -> str:
    payload = json.dumps({"base": base, "base_folder": base_folder.name, "recipe": asdict(recipe),
                          "version": SFT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sft_checkpoint(base: str = "tiny", recipe: SftRecipe = DEFAULT_RECIPE, *, cache_dir: Path | str | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """The fine-tuned checkpoint folder for a bundled model, built on first use."""
    base_folder = ensure_model(base, cache_dir=cache_dir, log=log)
    folder = cache_root(cache_dir) / "sft" / f"{base}-{recipe_key(base, base_folder, recipe)}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S):
            if not folder.exists():
                _build(base, base_folder, recipe, folder, log)
            verify(folder)
    except Timeout as exc:
        raise RlparityError(f"waited {LOCK_TIMEOUT_S}s for another process building the SFT warm start of {base!r} "
                            f"(lock {lock.lock_file}); if no build is running, delete the lock file") from exc
    return folder


def verify(folder: Path) -> None:
    """Every file of the cached checkpoint is the one the build wrote (sha256 in the manifest), checked on every use."""
    what, hint = f"SFT checkpoint {folder}", f"delete the folder to rebuild it (rm -r {folder})"
    check_files(folder, read_manifest(folder, MANIFEST, what, hint)["files"], what, hint, MANIFEST)


def _build(base: str, base_folder: Path, recipe: SftRecipe, folder: Path, log: Callable[[str], None]) -> None:
    staging = staging_folder(folder, log)
    shutil.copytree(base_folder, staging, ignore=shutil.ignore_patterns("*.safetensors*", "rlparity-build.json"))
    start = time.monotonic()
    env = ToolEnvironment(language_of(load_spec(base)))
    with deterministic_cpu():
        torch.manual_seed(recipe.seed)
        model, pad_id = load_policy(base_folder)
        losses = fine_tune(model, env, recipe, pad_id, log)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
    manifest = {"base": base, "base_folder": str(base_folder), "recipe": asdict(recipe), "version": SFT_VERSION,
                "losses": {"first": losses[0], "last": losses[-1]}, "seconds": round(time.monotonic() - start, 1),
                "files": file_hashes(staging, MANIFEST)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, folder)
    log(f"built the SFT warm start of {base!r} into {folder} in {manifest['seconds']}s")


def main(argv: list[str]) -> int:
    try:
        print(sft_checkpoint(argv[0] if argv else "tiny", log=lambda message: print(message, file=sys.stderr)))
    except RlparityError as exc:
        print(f"rlparity: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
