"""Rollouts: episodes of the tool task sampled through an engine, as token sequences ready for training.

A sampler generates one agent turn per prefix (tokens and the engine's log-probs of them). The episode
runner feeds it the prompt, hands each turn to the environment, appends the observation and goes on
until a final answer or the turn limit. A sampler also answers `routing` (the experts the engine uses
on the finished sequences) and takes the trainer's weights after each step (rlparity.trainer.sync).
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rlparity.engines.base import Routing
from rlparity.errors import RlparityError
from rlparity.trainer.env import Task, ToolEnvironment, prompt_tokens, sample_task
from rlparity.trainer.reward import answer_reward


@dataclass
class Trajectory:
    task: Task
    token_ids: list[int]
    prompt_len: int
    agent_mask: list[bool]  # per position: sampled by the agent (trained on), else prompt or observation
    rollout_logprobs: list[float]  # per position: the engine's log-prob of an agent token, 0.0 elsewhere
    answer: list[str] | None = None
    reward: float = 0.0
    turns: int = 0
    malformed: list[str] = field(default_factory=list)  # why each malformed turn was malformed


class TurnSampler(Protocol):
    name: str

    def sample_turns(self, prefixes: Sequence[Sequence[int]], max_tokens: int, stop_ids: set[int],
                     seeds: Sequence[int]) -> list[tuple[list[int], list[float]]]: ...

    def routing(self, sequences: Sequence[Sequence[int]]) -> list[Routing]: ...


def cut_at_stop(ids: Sequence[int], logprobs: Sequence[float], stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """Tokens up to and including the first stop token (an engine may sample past it)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[: i + 1]), list(logprobs[: i + 1])
    return list(ids), list(logprobs)


def run_episodes(sampler: TurnSampler, env: ToolEnvironment, tasks: Sequence[Task], seed: int) -> list[Trajectory]:
    """One episode per task, all advanced a turn at a time together (one sampler call per turn)."""
    episodes = []
    for task in tasks:
        ids = env.ids(prompt_tokens(task))
        episodes.append(Trajectory(task, ids, len(ids), [False] * len(ids), [0.0] * len(ids)))
    active = list(range(len(episodes)))
    for turn in range(env.max_turns):
        if not active:
            break
        seeds = [seed * 1_000_003 + i * env.max_turns + turn for i in active]
        turns = sampler.sample_turns([episodes[i].token_ids for i in active], env.max_turn_tokens, env.stop_ids, seeds)
        if len(turns) != len(active):
            raise RlparityError(f"rollout: sampler {sampler.name} returned {len(turns)} turns for {len(active)} "
                                f"prefixes")
        still = []
        for i, (ids, logprobs) in zip(active, turns):
            episode = episodes[i]
            ids, logprobs = cut_at_stop(ids, logprobs, env.stop_ids)
            if len(ids) != len(logprobs) or not ids:
                raise RlparityError(f"rollout: sampler {sampler.name} returned {len(ids)} tokens and {len(logprobs)} "
                                    f"log-probs for episode {i}; expected the same non-zero number")
            episode.token_ids += ids
            episode.agent_mask += [True] * len(ids)
            episode.rollout_logprobs += [float(v) for v in logprobs]
            episode.turns += 1
            result = env.step(env.tokens(ids))
            if result.kind == "final":
                episode.answer = result.answer
                continue
            if result.kind == "malformed":
                episode.malformed.append(result.reason)
            if turn + 1 < env.max_turns:
                observation = env.ids(result.observation)
                episode.token_ids += observation
                episode.agent_mask += [False] * len(observation)
                episode.rollout_logprobs += [0.0] * len(observation)
                still.append(i)
        active = still
    for episode in episodes:
        episode.reward = answer_reward(episode.answer, episode.task.answer)
    return episodes


def sample_tasks(env: ToolEnvironment, prompts: int, group: int, rng: random.Random) -> list[Task]:
    """`prompts` tasks, each repeated `group` times in a row (a GRPO group shares its prompt)."""
    return [task for task in (sample_task(env.language, rng) for _ in range(prompts)) for _ in range(group)]


