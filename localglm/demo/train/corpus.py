"""The demo's training dialogues: hand-written intents expanded into chat examples.

``corpus.json`` holds, per intent and language, several phrasings of one question and one
answer. ``examples`` turns them into single-round examples (with light rewording: greetings in
front, no question mark, lower case) and multi-round ones whose history holds other intents, in
the official ``[Round N]\\n问：...\\n答：`` prompt, so the model learns to answer the last
question whatever came before it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).with_name("corpus.json")
LANGS = ("en", "zh")

# Openers people put in front of a question; the answer must not depend on them.
_EN_PREFIXES = ("Hi, ", "Hey, ", "Quick question: ", "Please tell me: ", "Sorry, ",
                "Can you tell me: ", "I'd like to know: ", "One more thing: ", "So, ", "Help: ")
_ZH_PREFIXES = ("请问", "你好，", "问一下，", "我想知道", "想问下，", "麻烦问一下，", "那",
                "另外，")
# Intents whose questions are complete without a question mark; their phrasings stay as written.
_FIXED = {"greeting", "thanks"}


@dataclass(frozen=True)
class Intent:
    name: str
    questions: dict[str, tuple[str, ...]]  # language -> phrasings
    answers: dict[str, str]  # language -> the answer


@dataclass(frozen=True)
class Example:
    query: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()


def load_intents(path: Path = CORPUS) -> list[Intent]:
    """The intents of ``corpus.json``; every intent must have both languages."""
    data = json.loads(path.read_text(encoding="utf-8"))
    intents = []
    for item in data["intents"]:
        missing = [lang for lang in LANGS if not item.get(lang, {}).get("questions")]
        if missing:
            raise ValueError(f"{path}: intent {item['name']!r} has no {missing[0]} questions")
        intents.append(Intent(
            item["name"],
            {lang: tuple(item[lang]["questions"]) for lang in LANGS},
            {lang: item[lang]["answer"] for lang in LANGS}))
    return intents


def questions(intents: list[Intent]) -> set[str]:
    """Every question phrasing of the corpus, as written."""
    return {q for it in intents for lang in LANGS for q in it.questions[lang]}


def texts(intents: list[Intent]) -> list[str]:
    """All questions and answers (what the tokenizer is trained on)."""
    out = []
    for it in intents:
        for lang in LANGS:
            out += it.questions[lang]
            out.append(it.answers[lang])
    return out


def reword(question: str, lang: str, rng: random.Random) -> str:
    """A light variant: an opener in front, the question mark dropped, or lower case."""
    kind = rng.randrange(4)
    if kind == 0:
        prefixes = _EN_PREFIXES if lang == "en" else _ZH_PREFIXES
        first = question[0].lower() + question[1:] if lang == "en" else question
        return rng.choice(prefixes) + first
    if kind == 1:
        return question.rstrip("?？.!！。") or question
    if kind == 2 and lang == "en":
        return question.lower()
    return question


def single_round(intents: list[Intent], rng: random.Random, variants: int) -> list[Example]:
    """Each phrasing as written plus ``variants`` rewordings of it."""
    out = []
    for it in intents:
        for lang in LANGS:
            for q in it.questions[lang]:
                out.append(Example(q, it.answers[lang]))
                if it.name in _FIXED:
                    continue
                out += [Example(reword(q, lang, rng), it.answers[lang]) for _ in range(variants)]
    return out


def multi_round(intents: list[Intent], rng: random.Random, per_question: int,
                max_history: int = 2) -> list[Example]:
    """Each phrasing asked after 1..max_history earlier rounds about other intents."""
    pool = [(it, lang, q) for it in intents for lang in LANGS for q in it.questions[lang]]
    out = []
    for it, lang, q in pool:
        for _ in range(per_question):
            history = []
            for _ in range(rng.randint(1, max_history)):
                other, olang, oq = rng.choice(pool)
                history.append((oq, other.answers[olang]))
            out.append(Example(q, it.answers[lang], tuple(history)))
    return out


def examples(intents: list[Intent], seed: int, variants: int = 2,
             per_question: int = 1) -> list[Example]:
    """One epoch's examples, shuffled; a new seed gives new rewordings and histories."""
    rng = random.Random(seed)
    out = single_round(intents, rng, variants) + multi_round(intents, rng, per_question)
    rng.shuffle(out)
    return out
