"""The trainer data-parallel over torch.distributed, the policy and the reference sharded with FSDP2.

Launched under torchrun (WORLD_SIZE > 1), every rank loads the checkpoint, shards the policy and the frozen
reference with `fully_shard` (each decoder layer, then the root) and trains on its share of each step's episodes:

    rollout      rank 0 alone holds the rollout engine: it samples every episode of the step (the same tasks and
                 seeds as one process would) and computes the advantages over the whole batch, so GRPO groups
                 and PPO's batch mean are never split; it then scatters contiguous, whole-group slices of the
                 episodes (and their advantages) to the ranks. The trainer's forward/backward, the part whose
                 memory grows with the model, is what scales; the engine scales on its own (vLLM's parallelism).
    loss         each rank's token sums are divided by the global denominators (all-reduced), and FSDP's
                 gradient average over ranks is undone by multiplying by the world size, so the gradient is
                 that of the single-process token-mean loss over the whole batch; only the reduction order
                 differs.
    mini-batches each rank splits its own slice into the configured number of mini-batches (a rank's slice
                 must divide evenly), so with one mini-batch the update equals the single-process one exactly.
    metrics      the first mini-batch's per-token tensors and routing are gathered to rank 0, which computes
                 the same metrics one process would and alone writes records and progress lines.
    weight sync  the full state dict is gathered onto rank 0 (get_model_state_dict, full_state_dict,
                 cpu_offload) and loaded into the engine and verified there.
"""

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from rlparity.errors import RlparityError
from rlparity.trainer.batch import Batch, token_logprobs

# Ranks other than 0 wait in a collective while rank 0 rolls out a step or evaluates the held-out tasks alone:
# the default training run's 256-task evaluation takes minutes on the 2-core machine; torchrun ends the other
# ranks at once should rank 0 fail, so the limit is only a backstop against a hang.
TRAIN_COLLECTIVE_TIMEOUT_S = 1800.0
LOGPROBS_METHOD = "rlparity_token_logprobs"


def launched_distributed() -> bool:
    """True under torchrun with more than one process (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def check_split(prompts_per_step: int, group: int, mini_batches: int, ranks: int) -> None:
    """Each rank gets whole GRPO groups and a slice its mini-batches divide."""
    if prompts_per_step % ranks:
        raise RlparityError(f"train: {prompts_per_step} prompts per step do not split over {ranks} ranks; every "
                            f"rank takes whole groups, so prompts per step must be a multiple of the world size")
    local = prompts_per_step // ranks * group
    if local % mini_batches:
        raise RlparityError(f"train: each of {ranks} ranks holds {local} episodes, which do not split into "
                            f"{mini_batches} mini-batches")


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on every decoder layer, then on the root, with a method to run token_logprobs as an FSDP forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    # token_logprobs calls model.model and reads lm_head.weight, not model.forward, so the root's parameters
    # (embeddings, final norm, lm_head) are only gathered if the call runs under the root's forward hooks.
    def logprobs(batch: Batch, chunk_size: int, temperature: float):
        return token_logprobs(model, batch, chunk_size, temperature)

    setattr(model, LOGPROBS_METHOD, logprobs)
    register_fsdp_forward_method(model, LOGPROBS_METHOD)
    return model


def model_logprobs(model: torch.nn.Module, batch: Batch, chunk_size: int,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    method = getattr(model, LOGPROBS_METHOD, None)
    if method is not None:
        return method(batch, chunk_size, temperature)
    return token_logprobs(model, batch, chunk_size, temperature)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors: all of them on rank 0, an empty dict on the others (a collective)."""
    if not active():
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def scatter(per_rank: Sequence | None):
    """Rank 0's per_rank[r] arrives on rank r (other ranks pass None)."""
    received = [None]
    dist.scatter_object_list(received, list(per_rank) if rank() == 0 else None, src=0)
    return received[0]


def broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list | None:
    """Every rank's value, by rank, on rank 0; None elsewhere."""
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor, as a new tensor (outside autograd)."""
    total = value.detach().clone()
    if active():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the whole model: with sharded gradients the norm is reduced over ranks first."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in parameters if p.grad is not None], max_norm, total)
    return total
