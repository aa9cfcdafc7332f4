"""A small synthetic language the bundled models are trained on, built to be reused by the RL trainer.

Every token is a whole word, a digit, a symbol or a special token, so text and token ids convert both
ways without ambiguity (numbers are spelled digit by digit: "47" is the tokens "4" "7").

A seeded *world* gives each of a few hundred invented names a number, a colour and a size. Documents:

    fact        the number of bako is 47 . the color of riko is red .
    arithmetic  12 + 7 = 19 . 9 * 3 = 27 .
    recall      bako = 47 , riko = 12 , sute = 8 . riko ? 12 .        (in-context lookup: copying)
    dialogue    <|start|>user<|message|>what is the color of bako ?<|end|>
                <|start|>assistant<|channel|>final<|message|>red<|end|>

The special tokens follow GPT-OSS's harmony format, and the tool names (`calculator`, `lookup`) are in
the vocabulary already, so a tool-use format can be added later without changing the tokenizer.
Randomness comes only from `random.Random.random()` and `randrange()`, whose outputs Python keeps
stable across versions and platforms, so a seed gives the same text everywhere.
"""

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

PAD = "<|pad|>"
EOS = "<|endoftext|>"
UNK = "<|unk|>"
START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN = "<|call|>", "<|return|>"
SPECIAL_TOKENS = (PAD, EOS, UNK, START, END, MESSAGE, CHANNEL, CALL, RETURN)

DIGITS = tuple("0123456789")
SYMBOLS = ("+", "-", "*", "=", "?", ".", ",", ":", "(", ")")
WORDS = (
    "the", "of", "is", "what", "and", "plus", "minus", "times", "number", "color", "size", "answer", "to",
    "user", "assistant", "system", "final", "analysis", "commentary", "calculator", "lookup", "tool",
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown", "pink", "gold")
SIZES = ("tiny", "small", "medium", "large", "huge")
ATTRIBUTES = ("number", "color", "size")
FIXED_TOKENS = SPECIAL_TOKENS + DIGITS + SYMBOLS + WORDS + COLORS + SIZES

ONSETS = "bdfgklmnprstvz"
VOWELS = "aeiou"
NUMBER_RANGE = 100  # world numbers are 0..99
ZIPF_EXPONENT = 1.1  # how much more often frequent names appear: rank ** -1.1, like word frequencies


def invented_names(count: int, seed: int) -> list[str]:
    """`count` distinct pronounceable names (two or three consonant-vowel syllables), none a fixed word."""
    syllables = [onset + vowel for onset in ONSETS for vowel in VOWELS]
    two = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
    three = ["".join(triple) for triple in itertools.product(syllables[:24], repeat=3)]
    candidates = [name for name in two + three if name not in FIXED_TOKENS]
    if count > len(candidates):
        raise ValueError(f"asked for {count} names, the syllable scheme makes {len(candidates)}")
    return seeded_sample(candidates, count, random.Random(seed))


def seeded_sample(population: list, count: int, rng: random.Random) -> list:
    """A partial Fisher-Yates shuffle using only randrange (stable across Python versions)."""
    pool = list(population)
    for i in range(count):
        j = i + rng.randrange(len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:count]


def vocabulary(vocab_size: int, seed: int) -> list[str]:
    """Token strings in id order: the fixed tokens, then invented names up to `vocab_size`."""
    if vocab_size <= len(FIXED_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(FIXED_TOKENS)} fixed tokens, got {vocab_size}")
    return list(FIXED_TOKENS) + invented_names(vocab_size - len(FIXED_TOKENS), seed)


@dataclass(frozen=True)
class World:
    """The facts every fact, recall and dialogue document draws on."""

    names: tuple[str, ...]  # by frequency rank: names[0] is the most frequent
    number: dict[str, int]
    color: dict[str, str]
    size: dict[str, str]

    @classmethod
    def generate(cls, names: list[str], seed: int) -> "World":
        rng = random.Random(seed)
        return cls(
            names=tuple(names),
            number={name: rng.randrange(NUMBER_RANGE) for name in names},
            color={name: COLORS[rng.randrange(len(COLORS))] for name in names},
            size={name: SIZES[rng.randrange(len(SIZES))] for name in names},
        )

    def attribute(self, name: str, attribute: str) -> str | int:
        return {"number": self.number, "color": self.color, "size": self.size}[attribute][name]


def spell(value: str | int) -> list[str]:
    """A value as tokens: numbers digit by digit."""
    return list(str(value)) if isinstance(value, int) else [value]


class Language:
    """The document generator for one vocabulary and world; `documents(seed)` is an endless stream."""

    def __init__(self, vocab_size: int, seed: int):
        self.tokens = vocabulary(vocab_size, seed)
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.world = World.generate(self.tokens[len(FIXED_TOKENS):], seed)
        weights = [(rank + 1) ** -ZIPF_EXPONENT for rank in range(len(self.world.names))]
        self._cumulative = list(itertools.accumulate(weights))

    def name(self, rng: random.Random) -> str:
        """A name drawn with Zipfian frequency."""
        point = rng.random() * self._cumulative[-1]
        return self.world.names[min(bisect.bisect(self._cumulative, point), len(self.world.names) - 1)]

    def fact(self, rng: random.Random) -> list[str]:
        name, attribute = self.name(rng), ATTRIBUTES[rng.randrange(len(ATTRIBUTES))]
        return ["the", attribute, "of", name, "is", *spell(self.world.attribute(name, attribute)), "."]

    def equation(self, rng: random.Random) -> list[str]:
        a, b = rng.randrange(30), rng.randrange(30)
        op = ("+", "-", "*")[rng.randrange(3)]
        if op == "-" and b > a:
            a, b = b, a
        if op == "*":
            a, b = a % 10, b % 10
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return [*spell(a), op, *spell(b), "=", *spell(result), "."]

    def fact_document(self, rng: random.Random) -> list[str]:
        return [token for _ in range(2 + rng.randrange(4)) for token in self.fact(rng)]

    def arithmetic_document(self, rng: random.Random) -> list[str]:
        return [token for _ in range(2 + rng.randrange(4)) for token in self.equation(rng)]

    def recall_document(self, rng: random.Random) -> list[str]:
        """Pairs with values fresh for this document, then a query answered by copying from the context."""
        names: list[str] = []
        for _ in range(2 + rng.randrange(5)):
            name = self.name(rng)
            while name in names:
                name = self.name(rng)
            names.append(name)
        pairs = [(name, rng.randrange(NUMBER_RANGE)) for name in names]
        context = [token for i, (name, value) in enumerate(pairs)
                   for token in ([","] if i else []) + [name, "=", *spell(value)]]
        asked, value = pairs[rng.randrange(len(pairs))]
        return [*context, ".", asked, "?", *spell(value), "."]

    def dialogue_document(self, rng: random.Random) -> list[str]:
        if rng.randrange(2):
            name, attribute = self.name(rng), ATTRIBUTES[rng.randrange(len(ATTRIBUTES))]
            question = ["what", "is", "the", attribute, "of", name, "?"]
            answer = spell(self.world.attribute(name, attribute))
        else:
            equation = self.equation(rng)
            split = equation.index("=")
            question = ["what", "is", *equation[:split], "?"]
            answer = equation[split + 1 : -1]
        return [START, "user", MESSAGE, *question, END, START, "assistant", CHANNEL, "final", MESSAGE, *answer, END]

    def document(self, rng: random.Random) -> list[str]:
        kinds = (self.fact_document, self.arithmetic_document, self.recall_document, self.dialogue_document)
        return kinds[rng.randrange(len(kinds))](rng) + [EOS]

    def documents(self, seed: int) -> Iterator[list[str]]:
        rng = random.Random(seed)
        while True:
            yield self.document(rng)

    def token_stream(self, seed: int) -> Iterator[int]:
        for document in self.documents(seed):
            yield from (self.ids[token] for token in document)

    def batches(self, seed: int, batch: int, seq_len: int) -> Iterator[list[list[int]]]:
        """Endless [batch, seq_len] blocks of the packed document stream (documents cross block edges)."""
        stream = self.token_stream(seed)
        while True:
            yield [[next(stream) for _ in range(seq_len)] for _ in range(batch)]


def render(tokens: list[str]) -> str:
    """Text for a token list that the bundled tokenizer encodes back to the same tokens."""
    return " ".join(tokens)
