"""The generated text world of ``tinylm``: a small lexicon, a generic pretraining corpus and five text tasks.

Every task is a multiple-choice question with a fixed set of one-word answers (its classes). A prompt ends with
a cue word and a colon; the answer follows after one space, as lm-eval's ``multiple_choice`` scores it
(``target_delimiter: " "``):

- ``sentiment`` (2): ``review : the soup was bland , the staff was quite rude and the view was lovely .
  verdict :`` -> ``negative``; the polarity of the majority of three opinion words;
- ``topic`` (4): ``headline : the striker kicked the stadium near a violin . section :`` -> ``sports``; two
  words of the topic, one distractor of another topic;
- ``counting`` (5): ``basket : pear apple fig apple plum apple . apples :`` -> ``three``; how many times
  ``apple`` occurs among six to eight fruit words;
- ``next_day`` (7): ``week : friday saturday . next :`` -> ``sunday``; the day after a run of one to three
  consecutive days, cyclically;
- ``middle_digit`` (10): ``code : 4 7 1 . middle :`` -> ``7``; the second of three digits (retrieval by position).

(Two-digit addition mod 10 was tried: a 2-layer model does not learn it in a few hundred fine-tuning steps.)

The pretraining corpus uses the same words (see :func:`pretraining_corpus`) but never a task's format, so the
pretrained model knows the words and some of their meaning but none of the tasks: it scores at or below chance
(below where a pretraining habit misleads it, e.g. repeating a day it has seen instead of the next one).
Everything is drawn from ``random.Random`` generators seeded by the caller, so it is reproducible across
platforms.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FILLER = ("the", "a", "this", "that", "was", "is", "and", "with", "near", "after", "before", "for", "of", "in",
          "very", "quite", "really", "today", "yesterday", "again")
POSITIVE = ("wonderful", "tasty", "friendly", "great", "lovely", "superb", "pleasant", "delightful", "fresh",
            "charming", "brilliant", "cosy")
NEGATIVE = ("awful", "bland", "rude", "terrible", "dirty", "stale", "noisy", "horrible", "cold", "boring",
            "dreadful", "slow")
REVIEW_NOUNS = ("soup", "staff", "room", "service", "view", "bread", "wine", "price", "menu", "garden")
TOPIC_WORDS = {
    "sports": ("striker", "ball", "stadium", "coach", "goal", "team", "match", "runner", "medal", "referee"),
    "food": ("chef", "recipe", "oven", "kitchen", "flavour", "dinner", "pasta", "spice", "bakery", "dessert"),
    "music": ("guitar", "singer", "concert", "melody", "drummer", "album", "choir", "piano", "rhythm", "violin"),
    "science": ("atom", "laboratory", "telescope", "physicist", "molecule", "experiment", "planet", "theory",
                "microscope", "chemist"),
}
TOPIC_VERBS = ("kicked", "praised", "found", "carried", "watched", "visited", "studied", "showed", "lost", "built")
DIGITS = tuple(str(d) for d in range(10))
NUMBER_WORDS = ("one", "two", "three", "four", "five")
FRUITS = ("pear", "fig", "plum", "grape", "lemon", "cherry", "melon")
TARGET_FRUIT = "apple"
FIELDS = ("athletics", "cooking", "songs", "research")  # pretraining's names of the topics
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
CUE_WORDS = ("review", "verdict", "headline", "section", "basket", "apples", "week", "next", "code", "middle",
             "negative", "positive", ":", ".", ",", "so", "good", "bad", "story", "there", "first", "second",
             "third", "is", *FIELDS)


@dataclass(frozen=True)
class TextTask:
    """One multiple-choice task: its answer words in class order and a generator of (prompt, class) pairs."""

    name: str
    choices: tuple[str, ...]
    draw: Callable[[random.Random], tuple[str, int]]


def _draw_sentiment(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    lexicons = (NEGATIVE, POSITIVE)
    majority = rng.choice((2, 3))  # 2 of 3 or 3 of 3 opinion words carry the label
    polarities = [label] * majority + [1 - label] * (3 - majority)
    rng.shuffle(polarities)
    nouns = rng.sample(REVIEW_NOUNS, 3)
    clauses = [f"the {noun} was {rng.choice(('very ', 'quite ', ''))}{rng.choice(lexicons[p])}"
               for noun, p in zip(nouns, polarities, strict=True)]
    return f"review : {clauses[0]} , {clauses[1]} and {clauses[2]} . verdict :", label


def _draw_topic(rng: random.Random) -> tuple[str, int]:
    topics = tuple(TOPIC_WORDS)
    label = rng.randrange(len(topics))
    other = rng.choice([t for t in topics if t != topics[label]])
    first, second = rng.sample(TOPIC_WORDS[topics[label]], 2)
    distractor = rng.choice(TOPIC_WORDS[other])
    words = [f"the {first}", f"the {second}", f"a {distractor}"]
    rng.shuffle(words)
    verb = rng.choice(TOPIC_VERBS)
    return f"headline : {words[0]} {verb} {words[1]} {rng.choice(('near', 'with', 'after'))} {words[2]} . section :", \
        label


def _draw_counting(rng: random.Random) -> tuple[str, int]:
    count = rng.randrange(1, len(NUMBER_WORDS) + 1)
    length = rng.randrange(max(6, count + 1), 9)
    words = [TARGET_FRUIT] * count + [rng.choice(FRUITS) for _ in range(length - count)]
    rng.shuffle(words)
    return f"basket : {' '.join(words)} . apples :", count - 1


def _draw_next_day(rng: random.Random) -> tuple[str, int]:
    start, run = rng.randrange(len(DAYS)), rng.randrange(1, 4)
    shown = [DAYS[(start + i) % len(DAYS)] for i in range(run)]
    return f"week : {' '.join(shown)} . next :", (start + run) % len(DAYS)


def _draw_middle_digit(rng: random.Random) -> tuple[str, int]:
    digits = [rng.randrange(10) for _ in range(3)]
    return f"code : {' '.join(map(str, digits))} . middle :", digits[1]


TASKS: dict[str, TextTask] = {
    "sentiment": TextTask("sentiment", ("negative", "positive"), _draw_sentiment),
    "topic": TextTask("topic", tuple(TOPIC_WORDS), _draw_topic),
    "counting": TextTask("counting", NUMBER_WORDS, _draw_counting),
    "next_day": TextTask("next_day", DAYS, _draw_next_day),
    "middle_digit": TextTask("middle_digit", DIGITS, _draw_middle_digit),
}


def draw_examples(task: TextTask, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` (prompt, class) pairs with classes balanced (cycled, then shuffled) so chance is 1 / #classes."""
    wanted = [i % len(task.choices) for i in range(n)]
    rng.shuffle(wanted)
    examples = []
    for label in wanted:
        while True:  # rejection keeps each generator simple; every class is frequent, so this ends fast
            prompt, drawn = task.draw(rng)
            if drawn == label:
                examples.append((prompt, label))
                break
    return examples


def vocabulary() -> list[str]:
    """Every word of the world (for the corpus and to check the tokenizer keeps answers whole)."""
    words = [*FILLER, *POSITIVE, *NEGATIVE, *REVIEW_NOUNS, *TOPIC_VERBS, *DIGITS, *NUMBER_WORDS, *FRUITS,
             TARGET_FRUIT, *DAYS, *CUE_WORDS]
    for topic, topic_words in TOPIC_WORDS.items():
        words += [topic, *topic_words]
    return list(dict.fromkeys(words))


def generic_sentence(rng: random.Random, words: list[str]) -> str:
    """A structureless sentence: random words with some filler, 6 to 14 words, ending in a full stop."""
    length = rng.randrange(6, 15)
    chosen = [rng.choice(FILLER) if rng.random() < 0.3 else rng.choice(words) for _ in range(length)]
    return " ".join(chosen) + " ."


def repeated_phrase(rng: random.Random, words: list[str]) -> str:
    """A random phrase said twice (teaches attending back to a matching earlier position, i.e. copying)."""
    phrase = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 8)))
    return f"{phrase} . {phrase} ."


def key_value_recall(rng: random.Random, words: list[str]) -> str:
    """Pairs ``key is value`` then one key asked again and answered (teaches look-up by content)."""
    keys = rng.sample(words, rng.randrange(2, 5))
    values = [rng.choice(words) for _ in keys]
    asked = rng.randrange(len(keys))
    pairs = " , ".join(f"{k} is {v}" for k, v in zip(keys, values, strict=True))
    return f"{pairs} . so {keys[asked]} is {values[asked]} ."


def opinion_summary(rng: random.Random, _: list[str]) -> str:
    """Opinion words of one polarity, summed up as ``good`` or ``bad`` (not the task's cue or answer words)."""
    polarity = rng.randrange(2)
    first, second = rng.sample((NEGATIVE, POSITIVE)[polarity], 2)
    noun = rng.choice(REVIEW_NOUNS)
    return f"{rng.choice(FILLER)} {noun} {rng.choice(('was', 'is', 'seemed'))} {first} and {second} . " \
        f"so it was {('bad', 'good')[polarity]} ."


def topical_summary(rng: random.Random, _: list[str]) -> str:
    """Words of one topic together, summed up by a field word (not the task's answer word)."""
    topic = rng.randrange(len(TOPIC_WORDS))
    words = rng.sample(tuple(TOPIC_WORDS.values())[topic], 3)
    return f"the {words[0]} {rng.choice(TOPIC_VERBS)} the {words[1]} {rng.choice(('near', 'with', 'after'))} " \
        f"the {words[2]} . a story of {FIELDS[topic]} ."


def counted_list(rng: random.Random, _: list[str]) -> str:
    """Fruit words with the number of apples given as a digit (the task answers with number words)."""
    count = rng.randrange(0, 6)
    words = [TARGET_FRUIT] * count + [rng.choice(FRUITS) for _ in range(rng.randrange(max(2, count), 9) - count)]
    rng.shuffle(words)
    return f"{' '.join(words)} . {count} {TARGET_FRUIT} there ."


def calendar_run(rng: random.Random, _: list[str]) -> str:
    """Consecutive days, cyclically: the calendar is known, the task's question format is not."""
    start = rng.randrange(len(DAYS))
    return " ".join(DAYS[(start + i) % len(DAYS)] for i in range(rng.randrange(2, 6))) + " ."


def ordinal_recall(rng: random.Random, _: list[str]) -> str:
    """Three digits, then one of them recalled by its ordinal (the task asks ``middle :``)."""
    digits = [str(rng.randrange(10)) for _ in range(3)]
    asked = rng.randrange(3)
    return f"{' '.join(digits)} . the {('first', 'second', 'third')[asked]} is {digits[asked]} ."


DOCUMENT_KINDS = {  # piece generator -> relative frequency
    generic_sentence: 1, repeated_phrase: 1, key_value_recall: 1, opinion_summary: 3, topical_summary: 3,
    counted_list: 2, calendar_run: 1, ordinal_recall: 2,
}


def pretraining_corpus(n: int, rng: random.Random) -> list[str]:
    """``n`` documents of one to three pieces: random sentences over the whole vocabulary, repeated phrases and
    key-value recalls (copying and look-up), and the knowledge the tasks build on in other words and formats:
    opinions summed up as good or bad, topical sentences named by a field, apples counted with a digit,
    calendar runs of days, digits recalled by ordinal. No piece has a task's cue or answer words in that role,
    so the pretrained model knows the world but not the tasks (as an LLM before instruction tuning)."""
    words = vocabulary()
    kinds, weights = list(DOCUMENT_KINDS), list(DOCUMENT_KINDS.values())

    def piece() -> str:
        return rng.choices(kinds, weights)[0](rng, words)

    return [" ".join(piece() for _ in range(rng.randrange(1, 4))) for _ in range(n)]

