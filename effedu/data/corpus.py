"""The tiny corpus: English-like text from a seeded probabilistic grammar, shipped as ``data/tiny_corpus.txt``.

For the language-model chapters (training curves, distillation, quantisation, pruning ...) the course
ships ``data/tiny_corpus.txt``, about 200 KB of English-like text that :func:`generate_corpus` writes from a seeded
probabilistic grammar (a few hundred words): subjects, verbs and objects with number agreement across relative
clauses and prepositional phrases ("the keys near the old doors *are* ..."), a tense kept for a whole paragraph,
a protagonist named once and then referred to as "he"/"she", numbers that agree with their noun, quotes and
parentheses that are opened and closed. Short-range rules (spelling, "a"/"an") are learnt by any model;
the long-range ones are where attention earns its cost. ``python -m effedu.data --regenerate`` rewrites the file
(see ``data/README.md``); a test checks the shipped file is byte-for-byte ``generate_corpus()``.

Determinism: pure Python, a local ``random.Random(seed)`` and lists only (no set/dict iteration order involved),
so the text is the same on every platform.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

from .._checks import check_positive_int, check_seed

# --------------------------------------------------------------------------------------------------------------
# The tiny corpus: a seeded probabilistic grammar
# --------------------------------------------------------------------------------------------------------------

DEFAULT_CORPUS_PATH = Path(__file__).resolve().parents[2] / "data" / "tiny_corpus.txt"  # <repo>/data/, beside effedu/
DEFAULT_N_SENTENCES = 4700  # gives about 200 KB with seed 0

# Nouns as (singular, plural). Animate ones can see, sing, say things; inanimate ones are objects and places.
_ANIMATE = [
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("horse", "horses"), ("mouse", "mice"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("teacher", "teachers"), ("farmer", "farmers"),
    ("baker", "bakers"), ("king", "kings"), ("queen", "queens"), ("sailor", "sailors"), ("doctor", "doctors"),
    ("student", "students"), ("friend", "friends"), ("neighbor", "neighbors"), ("wolf", "wolves"), ("owl", "owls"),
    ("rabbit", "rabbits"), ("bear", "bears"), ("goat", "goats"), ("frog", "frogs"), ("duck", "ducks"),
    ("painter", "painters"), ("soldier", "soldiers"), ("traveler", "travelers"), ("musician", "musicians"),
    ("girl", "girls"), ("boy", "boys"), ("merchant", "merchants"), ("fisherman", "fishermen"), ("goose", "geese"),
]
_THINGS = [
    ("book", "books"), ("apple", "apples"), ("box", "boxes"), ("key", "keys"), ("letter", "letters"),
    ("lamp", "lamps"), ("cup", "cups"), ("stone", "stones"), ("map", "maps"), ("coat", "coats"),
    ("basket", "baskets"), ("bell", "bells"), ("clock", "clocks"), ("ship", "ships"), ("boat", "boats"),
    ("song", "songs"), ("story", "stories"), ("candle", "candles"), ("egg", "eggs"), ("hat", "hats"),
    ("ring", "rings"), ("door", "doors"), ("window", "windows"), ("bottle", "bottles"), ("coin", "coins"),
    ("flower", "flowers"), ("tree", "trees"), ("knife", "knives"), ("loaf", "loaves"), ("shoe", "shoes"),
    ("umbrella", "umbrellas"), ("orange", "oranges"), ("envelope", "envelopes"), ("mirror", "mirrors"),
    ("blanket", "blankets"), ("pencil", "pencils"), ("feather", "feathers"), ("bucket", "buckets"),
    ("picture", "pictures"), ("wheel", "wheels"),
]
_PLACES = [
    "market", "garden", "river", "forest", "village", "hill", "school", "harbor", "kitchen", "station",
    "library", "field", "tower", "mill", "bakery", "bridge", "castle", "lake", "valley", "square", "island",
    "orchard", "meadow", "cellar", "attic",
]
_ADJECTIVES = [
    "small", "big", "old", "young", "red", "blue", "green", "quiet", "loud", "happy", "sad", "hungry", "tired",
    "clever", "brave", "gentle", "strange", "bright", "dark", "warm", "cold", "heavy", "tall", "little", "round",
    "empty", "broken", "golden", "wooden", "shiny", "careful", "lazy", "curious", "ancient", "yellow", "white",
    "black", "gray", "honest", "elegant", "ugly", "angry", "orange", "early", "famous", "silent",
]
# Verbs as (3rd person singular present, base = plural present, past).
_TRANSITIVE = [
    ("sees", "see", "saw"), ("finds", "find", "found"), ("likes", "like", "liked"), ("carries", "carry", "carried"),
    ("watches", "watch", "watched"), ("follows", "follow", "followed"), ("helps", "help", "helped"),
    ("paints", "paint", "painted"), ("opens", "open", "opened"), ("holds", "hold", "held"),
    ("keeps", "keep", "kept"), ("loses", "lose", "lost"), ("builds", "build", "built"),
    ("chases", "chase", "chased"), ("feeds", "feed", "fed"), ("brings", "bring", "brought"),
    ("reads", "read", "read"), ("wants", "want", "wanted"), ("remembers", "remember", "remembered"),
    ("hides", "hide", "hid"), ("drops", "drop", "dropped"), ("buys", "buy", "bought"), ("sells", "sell", "sold"),
    ("cleans", "clean", "cleaned"), ("counts", "count", "counted"), ("loves", "love", "loved"),
    ("fixes", "fix", "fixed"), ("draws", "draw", "drew"), ("takes", "take", "took"),
    ("visits", "visit", "visited"), ("admires", "admire", "admired"), ("forgets", "forget", "forgot"),
]
_INTRANSITIVE = [
    ("sleeps", "sleep", "slept"), ("runs", "run", "ran"), ("sings", "sing", "sang"), ("waits", "wait", "waited"),
    ("laughs", "laugh", "laughed"), ("smiles", "smile", "smiled"), ("walks", "walk", "walked"),
    ("dances", "dance", "danced"), ("works", "work", "worked"), ("rests", "rest", "rested"),
    ("listens", "listen", "listened"), ("wanders", "wander", "wandered"), ("cries", "cry", "cried"),
    ("shouts", "shout", "shouted"), ("sits", "sit", "sat"), ("hurries", "hurry", "hurried"),
    ("whistles", "whistle", "whistled"), ("travels", "travel", "traveled"),
]
_SPEECH = ["said", "whispered", "shouted", "replied", "answered", "called", "murmured"]
_ADVERBS = [
    "quickly", "slowly", "quietly", "happily", "carefully", "suddenly", "softly", "loudly", "gently", "again",
    "early", "late", "together", "alone", "today", "twice",
]
_FEMALE = ["Anna", "Maria", "Lena", "Sofia", "Clara", "Nora", "Eva", "Ida", "Rosa", "Alice", "Mila", "Julia",
           "Emma", "Olga", "Tara", "Greta"]
_MALE = ["Tom", "Leo", "Max", "Paul", "Hugo", "Oscar", "Felix", "Ben", "Sam", "Omar", "Ivan", "Karl", "Peter",
         "Jonas", "Noah", "Victor"]
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_TIMES = ["in the morning", "at night", "every day", "in the evening", "at noon", "after dinner", "before dawn",
          "in winter", "in summer", "at dusk"]
_CONNECTIVES = ["and", "but", "because", "while", "so", "when", "although"]
_PREPOSITIONS = ["near", "behind", "beside", "under", "above", "beyond", "across", "inside"]


class _Grammar:
    """One paragraph at a time: a protagonist (name, gender), a tense, then sentences built from phrases.

    Agreement is carried by arguments: ``pl`` (is the subject plural?) decides "sees"/"see", "is"/"are",
    "was"/"were"; ``past`` is fixed for the paragraph; pronouns follow the protagonist's gender.
    """

    def __init__(self, rng: random.Random):
        self.r = rng
        self.past = False
        self.name, self.she = "Anna", True

    # ---- small pieces ------------------------------------------------------------------------------------------
    def chance(self, p):
        return self.r.random() < p

    @staticmethod
    def article(word, det):
        return ("an" if word[0] in "aeiou" or word.startswith("hon") else "a") if det == "a" else det

    def verb(self, forms, pl, past=None):
        past = self.past if past is None else past
        return forms[2] if past else (forms[1] if pl else forms[0])

    def be(self, pl, past=None):
        past = self.past if past is None else past
        return ("were" if pl else "was") if past else ("are" if pl else "is")

    def have(self, pl, past=None):
        past = self.past if past is None else past
        return "had" if past else ("have" if pl else "has")

    def adjs(self, p=0.45):
        words = []
        while len(words) < 2 and self.chance(p):
            a = self.r.choice(_ADJECTIVES)
            if a not in words:
                words.append(a)
        return words

    def place(self):
        return f"{self.r.choice(['in', 'at', 'near', 'behind', 'beside'])} the {self.r.choice(_PLACES)}"

    # ---- noun phrases ------------------------------------------------------------------------------------------
    def np(self, pl, animate, depth=0, allow_rel=True):
        """A noun phrase of number ``pl``; may carry a PP with a noun of *either* number (an attractor)."""
        sg_form, pl_form = self.r.choice(_ANIMATE if animate else _THINGS)
        noun = pl_form if pl else sg_form
        adj = self.adjs()
        if pl:
            det = self.r.choice(["the", "the", "these", "those", "some", "many", "my", "our", "NUM", "DIGITS"])
            if det == "NUM":
                det = self.r.choice(_NUMBER_WORDS)
            elif det == "DIGITS":
                det = str(self.r.randint(13, 99))
        else:
            det = self.r.choice(["the", "the", "a", "a", "this", "that", "every", "one", "my", "her", "his"])
        first = adj[0] if adj else noun
        words = [self.article(first, det)] + adj + [noun]
        if depth < 1 and self.chance(0.2):  # "the keys near the old doors": a noun of random number in between
            words += [self.r.choice(_PREPOSITIONS), self.np(self.chance(0.5), self.chance(0.3), depth + 1, False)]
        if allow_rel and depth < 1 and self.chance(0.18):
            words.append(self.rel_clause(pl, animate, depth + 1))
        return " ".join(words)

    def rel_clause(self, head_pl, head_animate, depth):
        rel = "who" if head_animate and self.chance(0.6) else "that"
        if head_animate and self.chance(0.5):  # subject relative: the verb agrees with the head noun
            return f"{rel} {self.vp(head_pl, depth + 1, short=True)}"
        # object relative: the verb agrees with the inner subject, not with the head
        inner_pl = self.chance(0.5)
        v = self.verb(self.r.choice(_TRANSITIVE), inner_pl)
        return f"that {self.np(inner_pl, True, depth + 1, False)} {v}"

    def subject(self):
        """(text, plural?) of a subject: a noun phrase, the protagonist's name or pronoun, or a pair of names."""
        x = self.r.random()
        if x < 0.5:
            pl = self.chance(0.45)
            return self.np(pl, True), pl
        if x < 0.7:
            return self.name, False
        if x < 0.88:
            return ("she" if self.she else "he"), False
        if x < 0.95:
            return f"{self.name} and {self.other_name()}", True
        return "they", True

    def other_name(self):
        while True:
            n = self.r.choice(_FEMALE + _MALE)
            if n != self.name:
                return n

    # ---- verb phrases ------------------------------------------------------------------------------------------
    def vp(self, pl, depth=0, short=False):
        x = self.r.random()
        if x < 0.45:
            words = [self.verb(self.r.choice(_TRANSITIVE), pl), self.np(self.chance(0.4), self.chance(0.25),
                                                                       depth + 1, allow_rel=not short)]
        elif x < 0.7:
            words = [self.verb(self.r.choice(_INTRANSITIVE), pl)]
            if self.chance(0.4):
                words.append(self.r.choice(_ADVERBS))
        elif x < 0.88:
            words = [self.be(pl), self.r.choice(_ADJECTIVES)]
            if self.chance(0.3):
                words += ["and", self.r.choice(_ADJECTIVES)]
        else:
            words = [self.be(pl), self.place()]
        if not short and self.chance(0.25):
            words.append(self.place() if self.chance(0.5) else self.r.choice(_TIMES))
        return " ".join(words)

    # ---- sentences ---------------------------------------------------------------------------------------------
    def clause(self):
        s, pl = self.subject()
        return f"{s} {self.vp(pl)}"

    def question(self, past=None):
        past = self.past if past is None else past
        pl = self.chance(0.45)
        s = self.np(pl, True, allow_rel=False)
        if self.chance(0.5):
            aux = "did" if past else ("do" if pl else "does")
            return f"{aux} {s} {self.r.choice(_TRANSITIVE)[1]} {self.np(self.chance(0.5), False, 1)}?"
        return f"{self.be(pl, past)} {s} {self.r.choice(_ADJECTIVES)}?"

    def speech(self):
        """Direct speech: the quote is opened, a present-tense sentence or question is said, the quote closes."""
        speaker = self.r.choice([self.name, "she" if self.she else "he", self.np(False, True, 1, False)])
        if self.chance(0.35):
            inner = self.question(past=False)
            verb = "asked"
        else:
            saved, self.past = self.past, False
            inner = self.clause() + self.r.choice([".", ".", "!"])
            self.past = saved
            verb = self.r.choice(_SPEECH)
        inner = inner[0].upper() + inner[1:]
        if self.chance(0.5):
            return f'{speaker} {verb}, "{inner}"'
        inner = inner[:-1] + ("," if inner[-1] == "." else inner[-1])
        if speaker in ("he", "she"):
            return f'"{inner}" {speaker} {verb}.'
        return f'"{inner}" {verb} {speaker}.'

    def counting(self):
        """'Anna has three red apples and one old book.' — numbers agree with their nouns."""
        items = []
        for _ in range(self.r.randint(1, 3)):
            k = self.r.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, self.r.randint(13, 99)])
            sg, pl = self.r.choice(_THINGS)
            adj = self.adjs(0.4)
            num = "one" if k == 1 else (_NUMBER_WORDS[k - 2] if k <= 12 else str(k))
            items.append(" ".join([num] + adj + [sg if k == 1 else pl]))
        listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        who = self.r.choice([self.name, "she" if self.she else "he"])
        return f"{who} {self.have(False)} {listed}."

    def dated(self):
        x = self.r.random()
        if x < 0.4:
            when = f"In {self.r.randint(1800, 2023)}"
        elif x < 0.7:
            when = f"On {self.r.choice(_DAYS)}"
        elif x < 0.85:
            when = f"In {self.r.choice(_MONTHS)}"
        else:
            when = f"At {self.r.randint(1, 12)}:{self.r.randint(0, 59):02d}"
        return f"{when}, {self.clause()}."

    def parenthetical(self):
        pl = self.chance(0.45)
        s = self.np(pl, True, allow_rel=False)
        aside = self.r.choice([
            f"{self.r.choice(_ADJECTIVES)} and {self.r.choice(_ADJECTIVES)}",
            f"{self.be(pl)} {self.r.choice(['still', 'always', 'never', 'often'])} {self.r.choice(_ADJECTIVES)}",
            f"the {self.r.choice(_THINGS)[0]} of {self.name}",
            f"{'they' if pl else 'it'} {self.be(pl)} true",
        ])
        return f"{s} ({aside}) {self.vp(pl)}."

    def sentence(self):
        x = self.r.random()
        if x < 0.36:
            s = self.clause() + "."
        elif x < 0.52:
            s = self.speech()
        elif x < 0.62:
            s = f"{self.clause()}, {self.r.choice(_CONNECTIVES)} {self.clause()}."
        elif x < 0.7:
            s = self.question()
        elif x < 0.78:
            s = self.counting()
        elif x < 0.86:
            s = self.dated()
        elif x < 0.93:
            s = self.parenthetical()
        else:
            s = f"{self.r.choice(_ADVERBS).capitalize()}, {self.clause()}."
        return s[0].upper() + s[1:]

    def paragraph(self, n):
        """n sentences about one protagonist, in one tense; the first sentence introduces them by name."""
        self.she = self.chance(0.5)
        self.name = self.r.choice(_FEMALE if self.she else _MALE)
        self.past = self.chance(0.5)
        intro = f"{self.name} {self.vp(False)}."
        return " ".join([intro] + [self.sentence() for _ in range(n - 1)])


def generate_corpus(n_sentences: int = DEFAULT_N_SENTENCES, seed: int = 0) -> str:
    """English-like text from the seeded grammar above: paragraphs of 2-9 sentences, one per line.

    Pure Python (``random.Random(seed)``, lists only, no set/dict iteration order involved), so the text is the
    same on every platform; ``generate_corpus()`` is exactly ``data/tiny_corpus.txt``.
    """
    check_positive_int(n_sentences, "n_sentences", "generate_corpus")
    check_seed(seed, "generate_corpus")
    g = _Grammar(random.Random(seed))
    lines, done = [], 0
    while done < n_sentences:
        n = min(g.r.randint(2, 9), n_sentences - done)
        lines.append(g.paragraph(n))
        done += n
    return "\n".join(lines) + "\n"


def _corpus_path(path):
    if path is None:
        return DEFAULT_CORPUS_PATH
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str, a pathlib.Path or None, got {type(path).__name__}")
    return Path(path)


def write_corpus(path=None, *, n_sentences: int = DEFAULT_N_SENTENCES, seed: int = 0) -> Path:
    """Write ``generate_corpus(n_sentences, seed)`` to ``path`` (default ``data/tiny_corpus.txt``), UTF-8, ``\\n``."""
    p = _corpus_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(generate_corpus(n_sentences, seed).encode("utf-8"))  # bytes: no newline translation anywhere
    return p


def load_corpus(path=None) -> str:
    """The text of the shipped corpus (or of ``path``); regenerated in memory, with a warning, if the file is gone."""
    p = _corpus_path(path)
    if not p.is_file():
        warnings.warn(f"load_corpus: {p} not found; regenerating the corpus in memory with generate_corpus() "
                      f"(run `python -m effedu.data --regenerate` to write it)", stacklevel=2)
        return generate_corpus()
    return p.read_bytes().decode("utf-8")



# --------------------------------------------------------------------------------------------------------------
# Labelled sentences from the same grammar (chapter 11's downstream probe)
# --------------------------------------------------------------------------------------------------------------

SENTENCE_KINDS = ("statement", "speech", "compound", "question", "counting", "dated", "parenthetical", "adverb")
LABELS = ("tense", "kind")


def _sentence_of_kind(g: _Grammar, kind: str) -> str:
    """One sentence of ``kind`` (the branches of :meth:`_Grammar.sentence`, picked by name instead of by chance)."""
    if kind == "statement":
        s = g.clause() + "."
    elif kind == "speech":
        s = g.speech()
    elif kind == "compound":
        s = f"{g.clause()}, {g.r.choice(_CONNECTIVES)} {g.clause()}."
    elif kind == "question":
        s = g.question()
    elif kind == "counting":
        s = g.counting()
    elif kind == "dated":
        s = g.dated()
    elif kind == "parenthetical":
        s = g.parenthetical()
    else:
        s = f"{g.r.choice(_ADVERBS).capitalize()}, {g.clause()}."
    return s[0].upper() + s[1:]


def generate_labelled_sentences(n: int, seed: int = 0, *, label: str = "tense") -> tuple[list[str], list[int], list[str]]:
    """``n`` single sentences of the corpus's grammar with a label each: ``(texts, labels, label_names)``.

    * ``label="tense"``: 0 = present, 1 = past (the tense the grammar kept for the sentence's main verbs; direct
      speech, always in the present inside its quotes, is left out). Balanced by construction (a fair coin).
    * ``label="kind"``: which of the grammar's 8 sentence builders wrote it (:data:`SENTENCE_KINDS`), drawn
      uniformly (the corpus itself draws them with unequal chances).

    Every sentence starts a new protagonist (name and gender drawn as for a paragraph), so no label leaks from one
    sentence to the next. Same alphabet as ``generate_corpus`` (the same words and punctuation), so the corpus's
    character tokenizer encodes every text. Pure Python with a local ``random.Random(seed)``: the same on every
    platform. ``generate_corpus`` is untouched (it does not call this).
    """
    check_positive_int(n, "n", "generate_labelled_sentences")
    check_seed(seed, "generate_labelled_sentences")
    if label not in LABELS:
        raise ValueError(f"generate_labelled_sentences: label must be one of {', '.join(LABELS)}, got {label!r}")
    g = _Grammar(random.Random(seed))
    no_speech = [k for k in SENTENCE_KINDS if k != "speech"]
    texts, labels = [], []
    for _ in range(n):
        g.she = g.chance(0.5)
        g.name = g.r.choice(_FEMALE if g.she else _MALE)
        g.past = g.chance(0.5)
        if label == "tense":
            texts.append(_sentence_of_kind(g, g.r.choice(no_speech)))
            labels.append(int(g.past))
        else:
            k = g.r.randrange(len(SENTENCE_KINDS))
            texts.append(_sentence_of_kind(g, SENTENCE_KINDS[k]))
            labels.append(k)
    names = ["present", "past"] if label == "tense" else list(SENTENCE_KINDS)
    return texts, labels, names
