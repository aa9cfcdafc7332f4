"""The tool environment and the reward: parsing, tools, masking, turn limit, exact reward."""

import random

import pytest

from rlparity.errors import RlparityError
from rlparity.models.language import Language
from rlparity.trainer.env import (
    TASK_KINDS,
    ToolEnvironment,
    calculator,
    call_tokens,
    final_tokens,
    lookup,
    parse_turn,
    sample_task,
)
from rlparity.trainer.reward import CORRECT, INCORRECT, answer_reward
from rlparity.trainer.rollout import run_episodes
from rlparity.trainer.sft import solved_episode


@pytest.fixture(scope="module")
def language():
    return Language(vocab_size=1024, seed=0)


@pytest.fixture(scope="module")
def env(language):
    return ToolEnvironment(language)


def test_reward_is_exact():
    assert answer_reward(["4", "7"], ("4", "7")) == CORRECT
    assert answer_reward(["4"], ("4", "7")) == INCORRECT
    assert answer_reward(["4", "7", "."], ("4", "7")) == INCORRECT
    assert answer_reward(None, ("red",)) == INCORRECT
    with pytest.raises(ValueError, match="empty"):
        answer_reward(["4"], ())


@pytest.mark.parametrize("arguments, expected", [
    (["1", "2", "+", "7"], ["1", "9"]), (["9", "-", "1", "2"], ["-", "3"]), (["3", "*", "4"], ["1", "2"]),
    (["1", "+"], None), (["+", "2"], None), (["0", "1", "+", "2"], None), (["1", "+", "2", "+", "3"], None),
    (["red", "+", "2"], None)])
def test_calculator(language, arguments, expected):
    assert calculator(language, arguments) == expected


def test_lookup(language):
    name = language.world.names[0]
    assert lookup(language, ["color", "of", name]) == [language.world.color[name]]
    assert lookup(language, ["number", "of", name]) == list(str(language.world.number[name]))
    assert lookup(language, ["color", "of", "nobody"]) is None
    assert lookup(language, ["weight", "of", name]) is None


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_solved_episodes_earn_the_reward(env, kind):
    for seed in range(5):
        task = sample_task(env.language, random.Random(seed), kinds=(kind,))
        tokens, mask = solved_episode(env, task)
        assert len(tokens) == len(mask)
        assert all(token in env.language.ids for token in tokens)
        kind_, _, answer = parse_turn(final_tokens(task.answer))
        assert kind_ == "final" and answer_reward(answer, task.answer) == CORRECT


@pytest.mark.parametrize("turn, why", [
    (["<|message|>", "4", "<|end|>"], "starts with"),
    (["<|channel|>", "final", "4", "<|end|>"], "final answer is"),
    (["<|channel|>", "commentary", "to", "lookup", "<|message|>", "color", "<|end|>"], "a call is"),
    (["<|channel|>", "analysis", "<|message|>", "4", "<|end|>"], "unknown channel"),
])
def test_malformed_turns_are_named(turn, why):
    kind, reason, _ = parse_turn(turn)
    assert kind == "malformed" and why in reason


def test_malformed_call_costs_a_turn_and_is_observed(env):
    result = env.step(call_tokens("system", ["1"]))
    assert result.kind == "malformed" and "unknown tool" in result.reason
    assert result.observation[:3] == ["<|start|>", "tool", "<|message|>"]
    result = env.step(call_tokens("calculator", ["red"]))
    assert result.kind == "malformed" and "cannot parse" in result.reason


def test_tool_returning_tokens_outside_the_vocabulary_raises(language):
    env = ToolEnvironment(language, tools={"lookup": lambda lang, args: ["forty-seven"]})
    with pytest.raises(RlparityError, match=r"returned \['forty-seven'\].*not in the model's vocabulary"):
        env.step(call_tokens("lookup", ["number", "of", language.world.names[0]]))
    env = ToolEnvironment(language, tools={"lookup": lambda lang, args: 47})
    with pytest.raises(RlparityError, match="expected a non-empty list of tokens"):
        env.step(call_tokens("lookup", ["number", "of", language.world.names[0]]))


class ScriptedSampler:
    """Plays fixed agent turns, one per call, with log-prob -1 per token."""

    name = "scripted"

    def __init__(self, env, turns):
        self.env, self.turns = env, [env.ids(turn) for turn in turns]
        self.calls = 0

    def sample_turns(self, prefixes, max_tokens, stop_ids, seeds):
        turn = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        return [(turn[:max_tokens], [-1.0] * len(turn[:max_tokens])) for _ in prefixes]

    def routing(self, sequences):
        raise AssertionError("not used")


def test_episode_masks_observations_and_scores_the_answer(env):
    task = sample_task(env.language, random.Random(3), kinds=("composite",))
    (lookup_call, lookup_args), (calc, calc_args) = task.calls
    sampler = ScriptedSampler(env, [call_tokens(lookup_call, lookup_args), call_tokens(calc, calc_args),
                                    final_tokens(task.answer)])
    (episode,) = run_episodes(sampler, env, [task], seed=0)
    assert episode.reward == CORRECT and episode.turns == 3 and not episode.malformed
    tokens = env.tokens(episode.token_ids)
    expected, mask = solved_episode(env, task)
    assert tokens == expected and episode.agent_mask == mask
    agent = [lp for lp, m in zip(episode.rollout_logprobs, episode.agent_mask) if m]
    assert agent == [-1.0] * sum(mask)
    observed = [t for t, m in zip(tokens[episode.prompt_len:], episode.agent_mask[episode.prompt_len:]) if not m]
    assert "lookup" in observed and task.answer[0] in observed  # observation tokens are the masked ones


def test_turn_limit_ends_an_episode_without_reward(env):
    task = sample_task(env.language, random.Random(0), kinds=("lookup",))
    sampler = ScriptedSampler(env, [call_tokens("system", ["1"])])
    (episode,) = run_episodes(sampler, env, [task], seed=0)
    assert episode.turns == env.max_turns and episode.answer is None and episode.reward == INCORRECT
    assert len(episode.malformed) == env.max_turns
    assert episode.agent_mask[-1]  # no observation after the last allowed turn


def test_turn_without_stop_token_is_cut_at_max_turn_tokens(env):
    task = sample_task(env.language, random.Random(0), kinds=("lookup",))
    sampler = ScriptedSampler(env, [["<|channel|>", "commentary"] + ["of"] * 40])
    (episode,) = run_episodes(sampler, env, [task], seed=0)
    assert sum(episode.agent_mask) == env.max_turns * env.max_turn_tokens
    assert episode.reward == INCORRECT
