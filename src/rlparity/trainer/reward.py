"""The tool task's reward: exact, deterministic, and only for a final answer given in the final channel.

    reward = 1  if the episode ended with a final answer whose tokens equal the true answer's tokens
             0  otherwise (wrong answer, no final answer within the turn limit, malformed output)

No partial credit and no format bonus: a number is right only digit for digit, so the reward cannot be
gamed by emitting the format without the content.
"""

from collections.abc import Sequence

CORRECT = 1.0
INCORRECT = 0.0


def answer_reward(answer: Sequence[str] | None, truth: Sequence[str]) -> float:
    """answer: the final-channel tokens (None when the episode gave no final answer); truth: the true tokens."""
    if not truth:
        raise ValueError("answer_reward: the true answer is empty; every task has a non-empty answer")
    if answer is None:
        return INCORRECT
    return CORRECT if list(answer) == list(truth) else INCORRECT
