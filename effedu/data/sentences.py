"""A small evaluation set of English sentences in topical groups, written by the project (``data/eval_sentences.tsv``).

The pretrained-model chapters ask "how much did this technique change the model?" (``effedu.pretrained.fidelity``):
embeddings before and after, and whether each sentence keeps its nearest neighbours. That needs sentences whose
neighbours mean something: here, 12 topics × 25 sentences, each built from topic-specific templates and slot
fillers by a seeded ``random.Random``, so two sentences of one topic share vocabulary and meaning while sentences of
different topics do not.

    python -m effedu.sentences --regenerate      # rewrites data/eval_sentences.tsv (topic <TAB> sentence)

``effedu.sentences`` re-exports this module. ``tests/test_pretrained.py`` checks that the shipped file equals
``generate_sentences()`` line for line.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "data" / "eval_sentences.tsv"  # <repo>/data/
PER_TOPIC = 25

# topic → (templates, slot fillers). {a}, {b}, {c} are filled from the topic's lists.
TOPICS = {
    "weather": (
        ["The forecast says {a} will reach the {b} by {c}.", "After a week of {a}, the {b} finally saw some sun {c}.",
         "Heavy {a} is expected over the {b} {c}.", "We cancelled the picnic in the {b} because of the {a} {c}.",
         "Meteorologists warned that {a} could hit the {b} {c}."],
        {"a": ["rain", "snow", "a storm", "strong wind", "thick fog", "a heatwave", "hail"],
         "b": ["coast", "valley", "city centre", "mountains", "northern plains", "islands"],
         "c": ["tonight", "on Friday", "this weekend", "tomorrow morning", "before noon"]}),
    "cooking": (
        ["Stir the {a} slowly and add a pinch of {b} {c}.", "My grandmother's recipe for {a} needs fresh {b} {c}.",
         "Roast the {a} with garlic and {b} {c}.", "The chef served {a} with a sauce of {b} {c}.",
         "Let the {a} simmer, then season it with {b} {c}."],
        {"a": ["soup", "risotto", "chicken", "vegetables", "lentil stew", "tomato sauce", "potatoes"],
         "b": ["salt", "thyme", "basil", "black pepper", "lemon", "rosemary", "butter"],
         "c": ["before serving", "for twenty minutes", "at the end", "over low heat", "in the oven"]}),
    "football": (
        ["The {a} scored twice in the {b} {c}.", "Fans cheered as the {a} saved a penalty in the {b} {c}.",
         "The coach praised the {a} after the {b} {c}.", "A late goal by the {a} won the {b} {c}.",
         "The {a} was shown a red card during the {b} {c}."],
        {"a": ["striker", "goalkeeper", "captain", "young winger", "defender", "midfielder"],
         "b": ["final", "derby", "semi-final", "league match", "cup tie", "second half"],
         "c": ["last night", "on Sunday", "at the stadium", "in front of a full crowd", "in extra time"]}),
    "computers": (
        ["The {a} crashed because the {b} ran out of memory {c}.", "I upgraded the {a} so the {b} would run faster {c}.",
         "The {a} needs a new {b} driver {c}.", "Restart the {a} after installing the {b} {c}.",
         "Our {a} compiles the {b} in a few seconds {c}."],
        {"a": ["laptop", "server", "database", "compiler", "operating system", "web browser"],
         "b": ["program", "graphics card", "kernel", "software update", "network", "application"],
         "c": ["again", "this morning", "after the update", "on every boot", "without warning"]}),
    "music": (
        ["The {a} played a slow {b} {c}.", "She practised the {b} on her {a} {c}.",
         "The orchestra's {a} opened the {b} {c}.", "He wrote a {b} for {a} and voice {c}.",
         "The audience applauded the {a} solo in the {b} {c}."],
        {"a": ["violin", "piano", "guitar", "cello", "trumpet", "drummer"],
         "b": ["melody", "concerto", "ballad", "sonata", "jazz standard", "symphony"],
         "c": ["at the concert", "every evening", "for the first time", "in the old church", "on the radio"]}),
    "travel": (
        ["Our {a} to {b} was delayed {c}.", "We booked a {a} to {b} {c}.",
         "The {a} from {b} arrived late {c}.", "Pack your passport before the {a} to {b} {c}.",
         "She missed the {a} to {b} {c}."],
        {"a": ["flight", "train", "ferry", "night bus", "connecting flight"],
         "b": ["Lisbon", "Tokyo", "Montreal", "Nairobi", "Oslo", "Lima", "Istanbul"],
         "c": ["by two hours", "for next summer", "because of a strike", "at the airport", "this time"]}),
    "health": (
        ["The doctor said {a} helps prevent {b} {c}.", "Regular {a} lowers the risk of {b} {c}.",
         "Patients with {b} should try {a} {c}.", "A study linked {a} to fewer cases of {b} {c}.",
         "The nurse recommended {a} to manage {b} {c}."],
        {"a": ["exercise", "a balanced diet", "more sleep", "daily walking", "drinking water", "meditation"],
         "b": ["heart disease", "diabetes", "high blood pressure", "back pain", "anxiety", "headaches"],
         "c": ["in older adults", "over time", "according to research", "for most people", "within months"]}),
    "finance": (
        ["The {a} raised {b} to fight inflation {c}.", "Investors sold {b} after the {a} report {c}.",
         "The {a} expects {b} to fall {c}.", "Rising {b} worried the {a} {c}.",
         "The {a} warned that {b} could stay high {c}."],
        {"a": ["central bank", "treasury", "market", "bank's analysts", "finance minister"],
         "b": ["interest rates", "stocks", "bond yields", "prices", "mortgage rates", "the currency"],
         "c": ["this quarter", "next year", "on Monday", "despite strong growth", "for some time"]}),
    "animals": (
        ["The {a} hunted {b} near the {c}.", "A young {a} was seen chasing {b} by the {c}.",
         "Researchers tracked a {a} feeding on {b} along the {c}.", "The {a} hid from the {b} in the {c}.",
         "At dawn the {a} drank at the {c} while {b} watched."],
        {"a": ["fox", "wolf", "heron", "lioness", "owl", "otter"],
         "b": ["rabbits", "fish", "mice", "insects", "small birds", "frogs"],
         "c": ["river", "forest edge", "lake", "meadow", "old barn", "reeds"]}),
    "space": (
        ["The {a} captured images of {b} {c}.", "Astronomers used the {a} to study {b} {c}.",
         "A new {a} will orbit {b} {c}.", "The {a} detected water on {b} {c}.",
         "Engineers launched the {a} toward {b} {c}."],
        {"a": ["telescope", "space probe", "rover", "satellite", "lunar lander"],
         "b": ["Mars", "Jupiter's moons", "a distant galaxy", "the Moon", "Saturn's rings", "a comet"],
         "c": ["last year", "for the first time", "in stunning detail", "after a long journey", "next decade"]}),
    "gardening": (
        ["Plant the {a} in {b} soil {c}.", "Water the {a} and cover them with {b} {c}.",
         "The {a} grew well in the {b} bed {c}.", "Prune the {a} and add {b} {c}.",
         "Our {a} need more {b} {c}."],
        {"a": ["tomatoes", "roses", "tulip bulbs", "herbs", "apple trees", "strawberries"],
         "b": ["compost", "sandy", "mulch", "sunny", "well-drained", "fertiliser"],
         "c": ["in early spring", "after the frost", "every autumn", "in the evening", "this season"]}),
    "education": (
        ["The {a} explained {b} to the class {c}.", "Students practised {b} with their {a} {c}.",
         "Our {a} gave a test on {b} {c}.", "The {a} found a new way to teach {b} {c}.",
         "Pupils asked the {a} about {b} {c}."],
        {"a": ["teacher", "professor", "tutor", "head teacher", "teaching assistant"],
         "b": ["fractions", "grammar", "the French revolution", "photosynthesis", "algebra", "poetry"],
         "c": ["this morning", "before the exam", "after lunch", "on Thursday", "with great patience"]}),
}


def generate_sentences(per_topic: int = PER_TOPIC, seed: int = 0) -> list[tuple[str, str]]:
    """``[(topic, sentence), ...]``: ``per_topic`` distinct sentences for each topic, seeded, in topic order."""
    if not isinstance(per_topic, int) or isinstance(per_topic, bool) or not 1 <= per_topic <= 100:
        raise ValueError(f"generate_sentences: per_topic must be an int in [1, 100], got {per_topic!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"generate_sentences: seed must be an int, got {type(seed).__name__}")
    rng = random.Random(seed)
    rows = []
    for topic, (templates, slots) in TOPICS.items():
        seen = set()
        while len(seen) < per_topic:
            template = rng.choice(templates)
            sentence = template.format(**{k: rng.choice(v) for k, v in slots.items()})
            if sentence not in seen:
                seen.add(sentence)
                rows.append((topic, sentence))
    return rows


def write_sentences(path=None, *, per_topic: int = PER_TOPIC, seed: int = 0) -> Path:
    path = DEFAULT_PATH if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\t{s}\n" for t, s in generate_sentences(per_topic, seed)), encoding="utf-8")
    return path


def load_sentences(path=None, *, topics=None) -> tuple[list[str], list[str]]:
    """``(sentences, topics)`` from the shipped file (optionally only the given topics)."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_sentences: {path} is missing; run `python -m effedu.sentences --regenerate`")
    rows = [line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if topics is not None:
        unknown = set(topics) - set(TOPICS)
        if unknown:
            raise ValueError(f"load_sentences: unknown topics {sorted(unknown)}; known: {', '.join(TOPICS)}")
        rows = [r for r in rows if r[0] in topics]
    return [s for _, s in rows], [t for t, _ in rows]


def main(argv=None):
    """``python -m effedu.sentences [--regenerate]``: print two sentences a topic, or rewrite the file."""
    ap = argparse.ArgumentParser(prog="python -m effedu.sentences", description=__doc__.splitlines()[0])
    ap.add_argument("--regenerate", action="store_true", help=f"rewrite {DEFAULT_PATH.name}")
    args = ap.parse_args(argv)
    if args.regenerate:
        print(f"wrote {write_sentences()}")
    else:
        for topic, sentence in generate_sentences(2):
            print(f"{topic:12s} {sentence}")


if __name__ == "__main__":
    main()
