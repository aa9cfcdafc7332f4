"""The reference RL trainer: rollouts through an engine, GRPO / PPO-clip updates, verified weight sync.

One step:
    1. sample prompts_per_step x group episodes of the tool task through the rollout engine
    2. advantages (GRPO: standardised within each prompt's group; PPO: reward minus the batch mean)
    3. reference log-probs (frozen initial policy) and, with old_logprob=recompute, a separate no-grad forward
       of the policy for old_log_prob, as verl does; with old_logprob=detach, old_log_prob is the training
       forward's own log-prob, detached (allowed only when the update is strictly on-policy)
    4. mini-batch updates: PPO-clip x rollout correction + KL penalty - entropy bonus, token-mean
    5. copy the weights into the engine and verify them there

Metrics of the first mini-batch of each step (before any update in that step) say whether the trainer is
on-policy: the ratio should be exactly 1 with detach, and any deviation with recompute is the second
forward disagreeing with the first (routing flips, kernel nondeterminism).

Under torchrun (WORLD_SIZE > 1) the same step runs data-parallel with the policy and reference sharded by FSDP2;
rank 0 rolls out and scatters whole groups, and alone writes records (rlparity.trainer.distributed).
"""

import contextlib
import copy
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlparity.engines.base import process_versions
from rlparity.errors import RlparityError
from rlparity.metrics import logprob_agreement
from rlparity.mismatch_metrics import framework_metrics
from rlparity.models.recipe import language_of
from rlparity.models.specs import load_spec
from rlparity.results import ERROR, PASS, Record, ResultStore
from rlparity.routing.agreement import compare_routing
from rlparity.routing.capture import RouterCapture
from rlparity.trainer import distributed
from rlparity.trainer.batch import Batch, make_batch
from rlparity.trainer.config import GRAD_CLIP, TrainConfig
from rlparity.trainer.env import ToolEnvironment
from rlparity.trainer.losses import (
    baseline_advantages,
    clipped_policy_loss,
    group_advantages,
    kl_k1,
    kl_k3,
    kl_penalty,
    ratio,
    rollout_correction,
)
from rlparity.trainer.policy import load_policy
from rlparity.trainer.rollout import run_episodes, sample_tasks
from rlparity.trainer.sync import verify_sync

STEP_PROPERTY = "trainer.step"
EVAL_PROPERTY = "trainer.eval"
EVAL_SEED = 10_007  # held-out tasks: a seed the training task stream (seed 0, 1, ...) does not use


class StepFailed(RlparityError):
    """A training step failed (e.g. its rollout engine died); its error record is written. A failed run, not bad
    input: commands exit with exit_status."""

    exit_status = 1


def masked_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1)


class Trainer:
    def __init__(self, config: TrainConfig, checkpoint: Path, sampler, store: ResultStore,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                 recompute_context: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None):
        """recompute_context(model): entered around the old_log_prob recompute pass only; the conformance suite
        plants a non-deterministic router there to check the deviation is caught."""
        config.check()
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if self.world > 1:
            distributed.check_split(config.prompts_per_step, config.group, config.resolved_mini_batches, self.world)
            if (sampler is None) != (self.rank != 0):
                raise RlparityError(f"train: under FSDP rank 0 alone holds the rollout engine; rank {self.rank} was "
                                    f"given {'none' if sampler is None else sampler.name}")
        self.config, self.sampler, self.store, self.log = config, sampler, store, log
        self.checkpoint = Path(checkpoint)
        self.policy, self.pad_id = load_policy(checkpoint)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if self.world > 1:
            self.policy, self.reference = distributed.shard(self.policy), distributed.shard(self.reference)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.lr, weight_decay=0.0)
        self.env = ToolEnvironment(language_of(load_spec(config.model)))
        self.rng = random.Random(config.seed)
        self.recompute_context = recompute_context or (lambda model: contextlib.nullcontext())
        engine = sampler.name if sampler is not None else "rank0-engine"
        self.subject = f"{config.algo}/{config.old_logprob}/{config.correction}/{engine}" + (
            f"/fsdp{self.world}" if self.world > 1 else "")
        self.engine_versions = process_versions(getattr(sampler, "engine", None))
        self.history: list[dict] = []
        self.sync = self.sync_weights()  # the engine starts from the trainer's weights

    def sync_weights(self) -> dict:
        """Copies the trainer's full weights into the engine and verifies them there (on rank 0 under FSDP)."""
        weights = distributed.full_state_dict(self.policy)  # a collective under FSDP
        if self.sampler is None:
            return {}
        self.sampler.load_weights(weights)
        return verify_sync(weights, self.sampler)

    def evaluate(self, label: str) -> float:
        """Mean reward on fixed held-out tasks, sampled through the engine with fixed seeds."""
        if self.rank != 0:
            return distributed.broadcast(None)
        tasks = sample_tasks(self.env, self.config.eval_prompts, 1, random.Random(EVAL_SEED))
        episodes = run_episodes(self.sampler, self.env, tasks, seed=EVAL_SEED)
        reward = sum(e.reward for e in episodes) / len(episodes)
        if self.world > 1:
            distributed.broadcast(reward)
        self._record(Record(EVAL_PROPERTY, self.subject, label, "float32", PASS, error=reward,
                            extra={"reward": reward, "episodes": len(episodes), "config": self.config.as_dict()}))
        return reward

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.config.algo == "grpo":
            return group_advantages(rewards, self.config.group)
        return baseline_advantages(rewards)

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return distributed.model_logprobs(self.reference, batch, self.config.chunk_size, self.config.temperature)[0]

    def _recompute_old(self, batch: Batch) -> tuple[torch.Tensor, list]:
        """(old_log_prob [T], the recompute pass's routing per sequence), from a no-grad eval-mode forward."""
        self.policy.eval()
        with torch.no_grad(), RouterCapture(self.policy) as capture, self.recompute_context(self.policy):
            old = distributed.model_logprobs(self.policy, batch, self.config.chunk_size, self.config.temperature)[0]
        self.policy.train()
        return old, capture.sequences(batch.lengths, batch.ids.shape[1])

    def step(self, index: int) -> dict:
        config = self.config
        start = time.monotonic()
        episodes = None
        if self.rank == 0:
            tasks = sample_tasks(self.env, config.prompts_per_step, config.group, self.rng)
            episodes = run_episodes(self.sampler, self.env, tasks, seed=config.seed * 100_003 + index)
            all_rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
            sequence_advantages = self.advantages(all_rewards)  # over the whole batch: no group is split
        rollout_s = time.monotonic() - start
        if self.world > 1:
            share = len(episodes) // self.world if self.rank == 0 else 0
            local, sequence_advantages = distributed.scatter(
                [(episodes[r * share:(r + 1) * share], sequence_advantages[r * share:(r + 1) * share])
                 for r in range(self.world)] if self.rank == 0 else None)
        else:
            local = episodes
        batch = make_batch(local, self.pad_id)
        token_rows = batch.token_rows
        advantages = sequence_advantages[token_rows]
        ref_logp = self._reference_logprobs(batch)
        old_all, recompute_routes = self._recompute_old(batch) if config.old_logprob == "recompute" else (None, None)
        metrics: dict = {}
        self.policy.train()
        order = torch.randperm(len(local), generator=torch.Generator().manual_seed(config.seed + index)).tolist()
        size = len(local) // config.resolved_mini_batches
        for epoch in range(config.resolved_epochs):
            for m in range(config.resolved_mini_batches):
                rows = sorted(order[m * size:(m + 1) * size])
                keep = torch.isin(token_rows, torch.tensor(rows))
                mini = batch.select(rows)
                first = epoch == 0 and m == 0
                with RouterCapture(self.policy) if first else contextlib.nullcontext() as capture:
                    logp, entropy = distributed.model_logprobs(self.policy, mini, config.chunk_size,
                                                               config.temperature)
                old = logp.detach() if old_all is None else old_all[keep]
                loss_pg, clipped = clipped_policy_loss(logp, old, advantages[keep], config.clip_epsilon)
                weights = rollout_correction(old, mini.rollout_logprobs, config.correction, config.correction_cap)
                kl = kl_penalty(logp, ref_logp[keep], config.kl_estimator)
                loss, reported = self._loss(loss_pg, weights, kl, entropy)
                if first:
                    training_routes = capture.sequences(mini.lengths, mini.ids.shape[1])
                    first_tensors = {
                        "sequences": [mini.ids[row, :length].tolist() for row, length in enumerate(mini.lengths)],
                        "rollout_logprobs": mini.rollout_logprobs, "logp": logp.detach(), "old": old.detach(),
                        "token_counts": mini.trained.sum(1).tolist(),
                        "clipped": clipped, "weights": weights, "entropy": entropy.detach(),
                        "ref_logp": ref_logp[keep], "training_routes": training_routes,
                        "recompute_routes": None if recompute_routes is None else [recompute_routes[r] for r in rows]}
                    if self.world > 1:
                        gathered = distributed.gather(first_tensors)
                        first_tensors = None if gathered is None else _concatenate(gathered)
                    if first_tensors is not None:
                        metrics |= self._first_minibatch_metrics(**first_tensors)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.world > 1:
                    grad_norm = distributed.clip_grad_norm(list(self.policy.parameters()), GRAD_CLIP)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), GRAD_CLIP)
                self.optimizer.step()
                metrics.setdefault("grad_norm", grad_norm.item())
                metrics.setdefault("loss", reported.item())
        self.sync = self.sync_weights()
        if self.rank != 0:
            return distributed.broadcast(None)  # rank 0's metrics, so every rank's history is the same
        metrics |= {
            "step": index,
            "reward": all_rewards.mean().item(),
            "tokens": sum(sum(e.agent_mask[1:]) for e in episodes),
            "malformed_turns": sum(len(e.malformed) for e in episodes),
            "mean_turns": sum(e.turns for e in episodes) / len(episodes),
            "rollout_s": rollout_s,
            "step_s": time.monotonic() - start,
            **self.sync,
        }
        if self.world > 1:
            distributed.broadcast(metrics)
        return metrics

    def _loss(self, loss_pg, weights, kl, entropy) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to differentiate, the loss of the whole mini-batch to report).

        Under FSDP each rank's token sums are divided by the denominators over all ranks, and the world size
        undoes FSDP's mean of the gradients over ranks, so the gradient is that of the one-process loss."""
        config = self.config
        if self.world == 1:
            loss = masked_mean(loss_pg, weights) + config.kl_coef * kl.mean() - config.entropy_coef * entropy.mean()
            return loss, loss.detach()
        weight_sum = distributed.all_sum(weights.sum()).clamp_min(1)
        tokens = distributed.all_sum(torch.tensor(float(kl.numel())))
        local = ((loss_pg * weights).sum() / weight_sum + config.kl_coef * kl.sum() / tokens
                 - config.entropy_coef * entropy.sum() / tokens)
        return local * self.world, distributed.all_sum(local)

    def _first_minibatch_metrics(self, sequences, rollout_logprobs, logp, old, token_counts, clipped, weights, entropy,
                                 ref_logp, training_routes, recompute_routes) -> dict:
        r = ratio(logp, old)
        agreement = logprob_agreement(logp, rollout_logprobs)
        # the training pass against the rollout in verl's, slime's and NeMo-RL's names, per sequence of the mini-batch
        frameworks = framework_metrics(torch.split(logp, token_counts), torch.split(rollout_logprobs, token_counts))
        routing = compare_routing(self.sampler.routing(sequences), training_routes, dtype=torch.float32,
                                  names=("rollout", "training"))
        extra = {}
        if recompute_routes is not None:
            extra["recompute_routing_flip_rate"] = compare_routing(
                recompute_routes, training_routes, dtype=torch.float32,
                names=("recompute", "training")).differ_any_layer
        return extra | frameworks | {
            "kl_k1": kl_k1(logp, ref_logp).mean().item(),
            "kl_k3": kl_k3(logp, ref_logp).mean().item(),
            "entropy": entropy.mean().item(),
            "ratio_mean": r.mean().item(),
            "ratio_max": r.max().item(),
            "ratio_min": r.min().item(),
            "clip_fraction": clipped.double().mean().item(),
            "old_logprob_deviation_max": (logp - old).abs().max().item(),
            "train_rollout_dlogp_mean": agreement["dlogp_mean"],
            "train_rollout_dlogp_max": agreement["dlogp_max"],
            "correction_weight_mean": weights.mean().item(),
            "routing_flip_rate": routing.differ_any_layer,
        }

    def progress(self, metrics: dict) -> str:
        recompute = metrics.get("recompute_routing_flip_rate")
        return (f"step {metrics['step'] + 1:3d}/{self.config.steps}  reward {metrics['reward']:.3f}  "
                f"kl {metrics['kl_k3']:.2e}  entropy {metrics['entropy']:.3f}  ratio {metrics['ratio_mean']:.6f} "
                f"[{metrics['ratio_min']:.6f}, {metrics['ratio_max']:.6f}]  clip {metrics['clip_fraction']:.3f}  "
                f"|dlogp| {metrics['train_rollout_dlogp_mean']:.1e}  flips {metrics['routing_flip_rate']:.3f}"
                + ("" if recompute is None else f" (recompute {recompute:.3f})") + f"  {metrics['step_s']:.1f}s")

    def _record(self, record: Record) -> None:
        """Written by rank 0 alone, naming the rollout engine's versions."""
        if self.rank == 0:
            record.engines = self.engine_versions
            self.store.append(record)

    def train(self) -> list[dict]:
        """Runs every step; a failing step is recorded as an error (earlier steps' records stay) and re-raised."""
        for index in range(self.config.steps):
            try:
                metrics = self.step(index)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self._record(Record(STEP_PROPERTY, self.subject, f"step {index}", "float32", ERROR, reason=reason,
                                         extra={"step": index, "config": self.config.as_dict()}))
                raise StepFailed(f"train: step {index} of {self.config.steps} failed ({reason}); the metrics of the "
                                 f"{index} completed steps are in {self.store.path}") from exc
            self._record(Record(STEP_PROPERTY, self.subject, f"step {index}", "float32", PASS,
                                extra=metrics | {"config": self.config.as_dict()}))
            self.history.append(metrics)
            if self.rank == 0:
                self.log(self.progress(metrics))
        return self.history


def _concatenate(per_rank: list[dict]) -> dict:
    """The first mini-batch's per-rank pieces joined in rank order: the whole mini-batch, as one process has it."""
    joined = {}
    for key, first in per_rank[0].items():
        if first is None:
            joined[key] = None
        elif isinstance(first, torch.Tensor):
            joined[key] = torch.cat([part[key] for part in per_rank])
        else:
            joined[key] = [item for part in per_rank for item in part[key]]
    return joined
