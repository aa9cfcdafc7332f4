"""A multi-turn tool-use task on rlparity's synthetic language, in GPT-OSS's harmony format.

An episode is one token sequence. The prompt asks a question and opens the assistant's turn; the agent
either calls a tool or answers. A tool's result comes back as observation tokens, which reopen the
assistant's turn, and the agent goes on until it answers or runs out of turns:

    prompt       <|start|> user <|message|> what is the number of bako plus 7 ? <|end|> <|start|> assistant
    agent        <|channel|> commentary to lookup <|message|> number of bako <|call|>
    observation  <|start|> lookup <|message|> 4 7 <|end|> <|start|> assistant
    agent        <|channel|> commentary to calculator <|message|> 4 7 + 7 <|call|>
    observation  <|start|> calculator <|message|> 5 4 <|end|> <|start|> assistant
    agent        <|channel|> final <|message|> 5 4 <|end|>

Only agent tokens are trained on; prompt and observation tokens are masked out of the loss. A call the
agent writes wrongly (unknown tool, unparsable arguments, no stop token) gets the observation
`<|start|> tool <|message|> ? <|end|> <|start|> assistant` and uses up a turn: the policy's mistake is
part of the task. A *tool* that returns something that is not text of the language is the
environment's bug and raises.

Tasks (each needs the tools, since the tiny model does not reliably know the world's facts):
    lookup      what is the color of bako ?              lookup, then answer
    calculator  what is 47 + 38 ?                        calculator, then answer
    composite   what is the number of bako plus 7 ?      lookup, calculator, then answer
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlparity.errors import RlparityError
from rlparity.models.language import ATTRIBUTES, CALL, CHANNEL, END, EOS, MESSAGE, START, Language, spell

TOOLS = ("calculator", "lookup")
TASK_KINDS = ("lookup", "calculator", "composite")
MALFORMED = "?"  # the observation text for a call the environment cannot run
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
CALCULATOR_OPERAND_RANGE = 30  # operands 0..29, the range of the pretraining arithmetic documents
COMPOSITE_ADDEND_RANGE = 10
DEFAULT_MAX_TURNS = 3  # the composite task needs all three
# the longest well-formed agent turn is 10 tokens (a calculator call on two 2-digit numbers)
DEFAULT_MAX_TURN_TOKENS = 12


@dataclass(frozen=True)
class Task:
    kind: str
    question: tuple[str, ...]
    answer: tuple[str, ...]
    calls: tuple[tuple[str, tuple[str, ...]], ...]  # the tool calls that solve it, in order (for SFT examples)


def sample_task(language: Language, rng: random.Random, kinds: Sequence[str] = TASK_KINDS) -> Task:
    kind = kinds[rng.randrange(len(kinds))]
    world = language.world
    if kind == "lookup":
        name, attribute = language.name(rng), ATTRIBUTES[rng.randrange(len(ATTRIBUTES))]
        value = spell(world.attribute(name, attribute))
        return Task(kind, ("what", "is", "the", attribute, "of", name, "?"), tuple(value),
                    (("lookup", (attribute, "of", name)),))
    if kind == "calculator":
        a, b = rng.randrange(CALCULATOR_OPERAND_RANGE), rng.randrange(CALCULATOR_OPERAND_RANGE)
        op = ("+", "-")[rng.randrange(2)]
        if op == "-" and b > a:
            a, b = b, a
        expression = (*spell(a), op, *spell(b))
        return Task(kind, ("what", "is", *expression, "?"), tuple(spell(OPERATORS[op](a, b))),
                    (("calculator", expression),))
    if kind == "composite":
        name, addend = language.name(rng), rng.randrange(1, COMPOSITE_ADDEND_RANGE)
        number = world.number[name]
        return Task(kind, ("what", "is", "the", "number", "of", name, "plus", *spell(addend), "?"),
                    tuple(spell(number + addend)),
                    (("lookup", ("number", "of", name)), ("calculator", (*spell(number), "+", *spell(addend)))))
    raise RlparityError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


def prompt_tokens(task: Task) -> list[str]:
    return [START, "user", MESSAGE, *task.question, END, START, "assistant"]


def call_tokens(tool: str, arguments: Sequence[str]) -> list[str]:
    return [CHANNEL, "commentary", "to", tool, MESSAGE, *arguments, CALL]


def final_tokens(answer: Sequence[str]) -> list[str]:
    return [CHANNEL, "final", MESSAGE, *answer, END]


def observation_tokens(source: str, text: Sequence[str]) -> list[str]:
    return [START, source, MESSAGE, *text, END, START, "assistant"]


def parse_number(tokens: Sequence[str]) -> int | None:
    if not tokens or not all(token.isdigit() and len(token) == 1 for token in tokens):
        return None
    if len(tokens) > 1 and tokens[0] == "0":
        return None
    return int("".join(tokens))


def calculator(language: Language, arguments: Sequence[str]) -> list[str] | None:
    """`A op B` with A, B spelled digit by digit, op one of + - *; None when it does not parse."""
    operators = [i for i, token in enumerate(arguments) if token in OPERATORS]
    if len(operators) != 1:
        return None
    split = operators[0]
    a, b = parse_number(arguments[:split]), parse_number(arguments[split + 1:])
    if a is None or b is None:
        return None
    result = OPERATORS[arguments[split]](a, b)
    return spell(result) if result >= 0 else ["-", *spell(-result)]


def lookup(language: Language, arguments: Sequence[str]) -> list[str] | None:
    """`attribute of name`; None for an unknown attribute or name."""
    if len(arguments) != 3 or arguments[0] not in ATTRIBUTES or arguments[1] != "of":
        return None
    if arguments[2] not in language.world.number:
        return None
    return spell(language.world.attribute(arguments[2], arguments[0]))


Tool = Callable[[Language, Sequence[str]], "list[str] | None"]
DEFAULT_TOOLS: dict[str, Tool] = {"calculator": calculator, "lookup": lookup}


@dataclass
class Turn:
    """What the environment made of one agent turn."""

    kind: str  # "call", "final" or "malformed"
    observation: list[str] = field(default_factory=list)  # tokens appended after the agent's turn (calls, malformed)
    answer: list[str] | None = None  # the final answer's tokens (final)
    reason: str = ""  # why a turn is malformed


def parse_turn(tokens: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """(kind, tool, body) of an agent turn; kind "malformed" with the reason in place of the tool."""
    if len(tokens) < 4 or tokens[0] != CHANNEL:
        return "malformed", f"a turn starts with {CHANNEL} and a channel name, got {list(tokens[:2])}", []
    if tokens[1] == "final":
        if tokens[2] != MESSAGE or tokens[-1] != END or len(tokens) < 5:
            return "malformed", f"a final answer is {CHANNEL} final {MESSAGE} ANSWER {END}", []
        return "final", None, list(tokens[3:-1])
    if tokens[1:3] == ["commentary", "to"] and len(tokens) >= 6:
        tool = tokens[3]
        if tokens[4] != MESSAGE or tokens[-1] != CALL:
            return "malformed", f"a call is {CHANNEL} commentary to TOOL {MESSAGE} ARGUMENTS {CALL}", []
        return "call", tool, list(tokens[5:-1])
    return "malformed", f"unknown channel or recipient {list(tokens[1:4])}", []


class ToolEnvironment:
    """Runs the agent's turns against the tools and decides when an episode ends."""

    def __init__(self, language: Language, tools: dict[str, Tool] | None = None,
                 max_turns: int = DEFAULT_MAX_TURNS, max_turn_tokens: int = DEFAULT_MAX_TURN_TOKENS):
        if max_turns < 1 or max_turn_tokens < 4:
            raise RlparityError(f"tool environment: max_turns must be >= 1 and max_turn_tokens >= 4 (the shortest "
                                f"turn), got {max_turns} and {max_turn_tokens}")
        self.language = language
        self.tools = dict(DEFAULT_TOOLS if tools is None else tools)
        self.max_turns = max_turns
        self.max_turn_tokens = max_turn_tokens
        self.stop_ids = {language.ids[token] for token in (CALL, END, EOS)}

    def ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.language.ids[token] for token in tokens]

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.language.tokens[i] for i in ids]

    def step(self, agent_tokens: Sequence[str]) -> Turn:
        kind, tool, body = parse_turn(agent_tokens)
        if kind == "malformed":
            return Turn("malformed", observation_tokens("tool", [MALFORMED]), reason=tool)
        if kind == "final":
            return Turn("final", answer=body)
        if tool not in self.tools:
            return Turn("malformed", observation_tokens("tool", [MALFORMED]),
                        reason=f"unknown tool {tool!r}, expected one of {sorted(self.tools)}")
        result = self.tools[tool](self.language, body)
        if result is None:
            return Turn("malformed", observation_tokens(tool, [MALFORMED]), reason=f"{tool} cannot parse {body}")
        self._check_observation(tool, body, result)
        return Turn("call", observation_tokens(tool, result))

    def _check_observation(self, tool: str, arguments: Sequence[str], result) -> None:
        if not isinstance(result, (list, tuple)) or not result:
            raise RlparityError(f"tool environment: tool {tool!r} called with {list(arguments)} returned {result!r}; "
                                f"expected a non-empty list of tokens of the language")
        unknown = [token for token in result if token not in self.language.ids]
        if unknown:
            raise RlparityError(f"tool environment: tool {tool!r} called with {list(arguments)} returned "
                                f"{list(result)}, whose tokens {unknown} are not in the model's vocabulary")
