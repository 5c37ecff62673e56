"""The demo's training dialogues: hand-written intents expanded into chat examples.

``corpus.json`` holds, per intent and language, several phrasings of one question, a few
topics (short verb phrases that the shared question frames turn into more questions: "How can
I {topic}?", "怎么{topic}？") and one answer. ``examples`` turns them into single-round examples
(with light rewording: an opener in front, no question mark, lower case, a word left out) and
multi-round ones whose history holds other intents, in the official ``[Round N]\\n问：...\\n答：``
prompt, so the model learns to answer the last question whatever came before it.
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
    topics: dict[str, tuple[str, ...]]  # language -> verb phrases for the question frames


@dataclass(frozen=True)
class Example:
    query: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()


def load_intents(path: Path = CORPUS) -> list[Intent]:
    """The intents of ``corpus.json``; every intent must have both languages."""
    data = _read(path)
    intents = []
    for item in data["intents"]:
        missing = [lang for lang in LANGS if not item.get(lang, {}).get("questions")]
        if missing:
            raise ValueError(f"{path}: intent {item['name']!r} has no {missing[0]} questions")
        intents.append(Intent(
            item["name"],
            {lang: tuple(item[lang]["questions"]) for lang in LANGS},
            {lang: item[lang]["answer"] for lang in LANGS},
            {lang: tuple(item[lang].get("topics", ())) for lang in LANGS}))
    return intents


def load_frames(path: Path = CORPUS) -> dict[str, tuple[str, ...]]:
    """Question frames per language, each with one ``{}`` for a topic."""
    return {lang: tuple(f) for lang, f in _read(path)["frames"].items()}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def questions(intents: list[Intent], frames: dict | None = None) -> set[str]:
    """Every question the corpus can ask before rewording: phrasings and framed topics."""
    frames = load_frames() if frames is None else frames
    out = {q for it in intents for lang in LANGS for q in it.questions[lang]}
    out |= {f.format(t) for it in intents for lang in LANGS
            for t in it.topics[lang] for f in frames[lang]}
    return out


def texts(intents: list[Intent], frames: dict | None = None) -> list[str]:
    """All questions, topics, frames and answers (what the tokenizer is trained on)."""
    frames = load_frames() if frames is None else frames
    out = [f.replace("{}", " ") for lang in LANGS for f in frames[lang]]
    for it in intents:
        for lang in LANGS:
            out += it.questions[lang] + it.topics[lang]
            out.append(it.answers[lang])
    return out


def reword(question: str, lang: str, rng: random.Random) -> str:
    """A light variant: an opener in front, the question mark dropped, or lower case."""
    kind = rng.randrange(5)
    words = question.split()
    if kind == 4 and lang == "en" and len(words) >= 5:  # a word left out: rely on the rest
        del words[rng.randrange(1, len(words) - 1)]
        return " ".join(words)
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


def framed(intents: list[Intent], frames: dict, rng: random.Random,
           per_topic: int) -> list[Example]:
    """Each topic in ``per_topic`` randomly chosen frames of its language."""
    out = []
    for it in intents:
        for lang in LANGS:
            for topic in it.topics[lang]:
                for f in rng.sample(frames[lang], per_topic):
                    out.append(Example(f.format(topic), it.answers[lang]))
    return out


def multi_round(intents: list[Intent], rng: random.Random, share: float,
                max_history: int = 2) -> list[Example]:
    """A ``share`` of the phrasings asked after 1..max_history earlier rounds of any intent."""
    pool = [(it, lang, q) for it in intents for lang in LANGS for q in it.questions[lang]]
    out = []
    for it, lang, q in pool:
        if rng.random() < share:
            history = []
            for _ in range(rng.randint(1, max_history)):
                other, olang, oq = rng.choice(pool)
                history.append((oq, other.answers[olang]))
            out.append(Example(q, it.answers[lang], tuple(history)))
    return out


def examples(intents: list[Intent], seed: int, variants: int = 1, per_topic: int = 2,
             multi_share: float = 0.5, frames: dict | None = None) -> list[Example]:
    """One epoch's examples, shuffled; a new seed gives new rewordings, frames and histories."""
    rng = random.Random(seed)
    frames = load_frames() if frames is None else frames
    out = (single_round(intents, rng, variants) + framed(intents, frames, rng, per_topic)
           + multi_round(intents, rng, multi_share))
    rng.shuffle(out)
    return out
