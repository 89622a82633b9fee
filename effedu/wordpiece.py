"""BERT's WordPiece tokenizer, from scratch (Python's ``unicodedata`` only).

A pretrained Transformer only understands the token ids it was trained on, so the first thing the course needs to
run a real model is the exact tokenizer of that model. BERT (Devlin et al. 2019, *BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding*, §3 and appendix A) and every model distilled from it —
all-MiniLM-L6-v2 among them — use **WordPiece** (Schuster & Nakajima 2012, *Japanese and Korean Voice Search*;
Wu et al. 2016, *Google's Neural Machine Translation System*, §4.1): a fixed vocabulary of ~30 k whole words and
word pieces, where a piece that continues a word is written with a ``##`` prefix (``"tokenization"`` →
``token ##ization``). Rare words are spelled out of frequent pieces, so almost nothing is out of vocabulary.

Turning text into ids takes two stages, both reproduced here step by step:

1. **Basic tokenisation** (BERT's ``BasicTokenizer``), a per-character normalisation then a split into words:

   a. *clean*: drop NUL, U+FFFD (the replacement character) and control/format characters (Unicode categories
      ``Cc``, ``Cf``, ``Co``, ``Cs``, but not ``\\t \\n \\r``); turn every whitespace character into a space;
   b. *isolate CJK ideographs*: put spaces around each Chinese/Japanese/Korean ideograph (BERT's code-point
      ranges) — these scripts have no spaces between words, so each ideograph becomes a word of its own;
   c. *strip accents and lower-case* (the "uncased" models): Unicode NFD splits ``é`` into ``e`` + a combining
      acute accent (category ``Mn``), which we drop; then each character is lower-cased;
   d. *split* on whitespace, then split every punctuation character off as a word of its own (ASCII symbols
      ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~`` count as punctuation too, as in BERT).

   The special tokens ``[CLS] [SEP] [PAD] [UNK] [MASK]`` written literally in the text are cut out *before* all
   of this and kept whole, as Hugging Face's tokenizer does.

2. **WordPiece** on each word: greedy *longest-match-first* — take the longest prefix of the word that is in the
   vocabulary, then the longest ``##``-prefixed piece of the rest, and so on. If some remainder has no piece at
   all, the whole word becomes ``[UNK]`` (not just the remainder); a word longer than 100 characters is ``[UNK]``
   without trying.

Finally the model's input is framed as ``[CLS] A [SEP]`` (or ``[CLS] A [SEP] B [SEP]`` for a sentence pair, the
second segment with token type 1), truncated to the 512 learned positions and padded with ``[PAD]`` (id 0) to a
rectangle; ``attention_mask`` marks the real tokens.

    tok = WordPieceTokenizer.from_vocab_file("vocab.txt")
    tok.tokenize("Tokenization, naïvely!")   # ['token', '##ization', ',', 'naive', '##ly', '!']
    batch = tok(["A cat sat on the mat.", "Attention is all you need."])   # dict of (2, T) LongTensors
    tok.decode(batch["input_ids"][0])        # 'a cat sat on the mat.'

The oracle is Hugging Face ``tokenizers`` on the same vocabulary (``tests/test_wordpiece.py``): token ids agree on
accents, punctuation, CJK, emoji, control characters, whitespace runs and random strings. One known divergence:
``tokenizers`` classifies characters with Unicode tables from about 2016, Python's ``unicodedata`` is newer, so a
few characters assigned since (e.g. U+0890, an Arabic format character from Unicode 14) are dropped here as format
characters but kept (→ ``[UNK]``) there. Which characters those are depends on the Python version, since each
ships its own ``unicodedata`` (``unicodedata.unidata_version``): Python 3.10 has Unicode 13.0, where U+0890 is
unassigned, so 3.10 keeps it (→ ``[UNK]``, like ``tokenizers``); 3.11 (14.0), 3.12 (15.0) and 3.13 (15.1) drop it.
Text made of characters assigned by Unicode 13 — everything the course tokenizes — gives the same ids everywhere.
"""
from __future__ import annotations

import operator
import os
import re
import unicodedata

import torch

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
REQUIRED_TOKENS = (PAD, UNK, CLS, SEP)  # [MASK] is only needed for masked-LM pre-training
CONTINUATION = "##"  # prefix of a piece that continues a word (Wu et al. 2016 mark word *starts* instead)
MAX_INPUT_CHARS_PER_WORD = 100  # BERT: longer "words" (URLs, base64, ...) are [UNK] outright
MODEL_MAX_LENGTH = 512  # BERT's learned position embeddings
_CACHE_LIMIT = 1 << 16  # whitespace-delimited chunks remembered (chunk → ids); cleared when full


# ---------------------------------------------------------------------------------------------------------------
# 1. Character classes (BERT's tokenization.py: _is_whitespace, _is_control, _is_punctuation, _is_chinese_char)
# ---------------------------------------------------------------------------------------------------------------
# Unicode's White_Space property (what Hugging Face's Rust code uses). Python's str.isspace() is slightly wider
# (it also accepts U+001C–U+001F, which are control characters here and get dropped).
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                        "\u200a\u2028\u2029\u202f\u205f\u3000")


def is_whitespace(ch):
    """True for a whitespace character (Unicode White_Space: space, tab, newlines, no-break and ideographic spaces)."""
    return ch in _WHITESPACE


def is_control(ch):
    """True for a control or format character, which BERT deletes (zero-width space, soft hyphen, BOM, U+0000–U+001F).

    Tab, newline and carriage return are control characters to Unicode but whitespace to BERT. The categories are
    ``Cc`` (control), ``Cf`` (format), ``Co`` (private use) and ``Cs`` (surrogate); unassigned code points (``Cn``)
    are kept, as Hugging Face does, and end up as ``[UNK]``.
    """
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def is_punctuation(ch):
    """True for a character BERT splits off as its own word: any Unicode ``P*`` category or an ASCII symbol.

    ASCII ``$ + < = > ^ ` | ~`` are *symbols* (``S*``) to Unicode, not punctuation, but BERT treats every
    non-alphanumeric printable ASCII character (code points 33–47, 58–64, 91–96, 123–126) as punctuation.
    """
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


# The CJK Unified Ideographs blocks BERT isolates (its comment: "CJK" here means ideographs only — Japanese kana
# and Korean Hangul are written with spaces or handled by WordPiece like any other script).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),    # CJK Unified Ideographs
    (0x3400, 0x4DBF),    # Extension A
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2B73F),  # Extension C
    (0x2B740, 0x2B81F),  # Extension D
    (0x2B820, 0x2CEAF),  # Extension E
    (0xF900, 0xFAFF),    # CJK Compatibility Ideographs
    (0x2F800, 0x2FA1F),  # CJK Compatibility Ideographs Supplement
)


def is_cjk_ideograph(ch):
    """True for a Chinese/Japanese/Korean ideograph (BERT's ``_is_chinese_char`` code-point ranges)."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


# ---------------------------------------------------------------------------------------------------------------
# 2. Normalisation: clean + isolate CJK, then (uncased) strip accents + lower-case.
# ---------------------------------------------------------------------------------------------------------------
# Each step maps one character to zero, one or a few characters, so it is a ``str.translate`` table. The tables
# are dicts that fill themselves in on first sight of a character (``__missing__``): a text costs one C-level pass
# per step, and the Python classification above runs once per distinct character ever seen.
class _CleanTable(dict):
    """Step 1a + 1b: ``ch`` → ``None`` (deleted), ``" "`` (whitespace), ``" 中 "`` (CJK) or ``ch`` itself."""

    def __missing__(self, cp):
        ch = chr(cp)
        if cp == 0 or cp == 0xFFFD or is_control(ch):
            out = None  # BERT deletes NUL, the replacement character and control/format characters
        elif is_whitespace(ch):
            out = " "  # every kind of whitespace becomes one plain space
        elif is_cjk_ideograph(ch):
            out = f" {ch} "  # an ideograph is a word of its own
        else:
            out = ch
        self[cp] = out
        return out


class _UncaseTable(dict):
    """Step 1c, after NFD: drop nonspacing marks (``Mn``: the accents NFD split off), lower-case the rest.

    Lower-casing is per character (``"Σ"`` → ``"σ"`` even at the end of a word, unlike ``str.lower``'s final-sigma
    rule), as Hugging Face's Rust code does.
    """

    def __missing__(self, cp):
        ch = chr(cp)
        out = None if unicodedata.category(ch) == "Mn" else ch.lower()
        self[cp] = out
        return out


_CLEAN = _CleanTable()
_UNCASE = _UncaseTable()


def normalize(text, *, lowercase=True):
    """BERT's normaliser: clean, isolate CJK ideographs and, for uncased models, strip accents and lower-case.

    ``normalize("Ångström\\tcafé 中文")`` → ``"angstrom cafe  中  文 "``. Accents go before lower-casing (as in
    Hugging Face's ``BertNormalizer``): NFD turns ``"Å"`` into ``"A"`` + U+030A (combining ring, category ``Mn``),
    the mark is dropped, and ``"A"`` is lower-cased.
    """
    text = text.translate(_CLEAN)
    if lowercase:
        # NFD = canonical decomposition: precomposed letters → base letter + combining marks (é → e + ◌́)
        text = unicodedata.normalize("NFD", text).translate(_UNCASE)
    return text


def split_on_punctuation(word):
    """Step 1d: every punctuation character becomes a word of its own: ``"don't!"`` → ``["don", "'", "t", "!"]``."""
    words, current = [], []
    for ch in word:
        if is_punctuation(ch):
            if current:
                words.append("".join(current))
                current = []
            words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def basic_tokenize(text, *, lowercase=True):
    """BERT's basic tokenisation of ``text`` (no special-token handling): normalise, split on spaces and punctuation."""
    return [w for chunk in normalize(text, lowercase=lowercase).split() for w in split_on_punctuation(chunk)]


# ---------------------------------------------------------------------------------------------------------------
# 3. WordPiece: greedy longest-match-first.
# ---------------------------------------------------------------------------------------------------------------
def wordpiece(word, vocab, *, unk=UNK, max_chars=MAX_INPUT_CHARS_PER_WORD, max_piece_chars=None):
    """Split one word into vocabulary pieces, longest match first: ``"unaffable"`` → ``["un", "##aff", "##able"]``.

    At each position take the *longest* substring that is in ``vocab`` (with ``##`` in front unless it starts the
    word) and move past it. Greedy matching does not look for the segmentation with fewest pieces — it is what BERT
    does and the vocabulary was built for it. If a remainder matches nothing, the *whole* word is ``[UNK]``; so is a
    word over ``max_chars`` characters. ``max_piece_chars`` (the longest entry in ``vocab``) only skips candidate
    substrings that cannot be in the vocabulary; the result is the same.
    """
    n = len(word)
    if n > max_chars:
        return [unk]
    longest = n if max_piece_chars is None else max_piece_chars
    pieces, start = [], 0
    while start < n:
        end = min(n, start + longest)
        piece = None
        while end > start:  # shrink the candidate from the right until it is in the vocabulary
            candidate = word[start:end] if start == 0 else CONTINUATION + word[start:end]
            if candidate in vocab:
                piece = candidate
                break
            end -= 1
        if piece is None:  # no piece covers word[start:]: the word cannot be spelled, it is unknown as a whole
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


def _cleanup(token):
    """Hugging Face's decoding clean-up, applied to each token (with its leading space) as its WordPiece decoder does.

    ``" ."`` → ``"."`` etc. Since BERT splits apostrophes off, ``it's`` decodes to ``"it ' s"``, as in Hugging Face.
    """
    return (token.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" do not", " don't")
            .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _token_id(token, doc):
    """A read-only property: the id of the special ``token`` in this vocabulary (``None`` if it has none; the
    constructor guarantees ``[PAD] [UNK] [CLS] [SEP]``)."""
    return property(lambda self: self.vocab.get(token), doc=doc)


# ---------------------------------------------------------------------------------------------------------------
# 4. The tokenizer.
# ---------------------------------------------------------------------------------------------------------------
class WordPieceTokenizer:
    """BERT's tokenizer (basic tokenisation + WordPiece) over a vocabulary, producing the model's input tensors.

    ``WordPieceTokenizer(tokens, *, lowercase=True, max_length=512)``: ``tokens`` lists the vocabulary, the id of a
    token being its position (as in BERT's ``vocab.txt``, one token per line); it must contain ``[PAD] [UNK] [CLS]
    [SEP]``. ``lowercase=True`` is for uncased models (lower-case and strip accents). ``max_length`` is the
    model's position limit: no sequence may be longer. Build it from a file with :meth:`from_vocab_file`.
    """

    def __init__(self, tokens, *, lowercase=True, max_length=MODEL_MAX_LENGTH):
        where = "WordPieceTokenizer"
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)):
            raise TypeError(f"{where}: tokens must be a list of vocabulary strings (id = position), got "
                            f"{type(tokens).__name__}; to read a vocab.txt use "
                            f"WordPieceTokenizer.from_vocab_file(path)")
        vocab = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"{where}: tokens[{i}] must be a non-empty str, got {tok!r}")
            if tok in vocab:
                raise ValueError(f"{where}: token {tok!r} appears twice (ids {vocab[tok]} and {i}); "
                                 f"every vocabulary entry must be unique")
            vocab[tok] = i
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{where}: the vocabulary lacks the special token(s) {missing}; "
                             f"a BERT vocabulary needs {list(REQUIRED_TOKENS)}")
        if not isinstance(lowercase, bool):
            raise TypeError(f"{where}: lowercase must be a bool, got {type(lowercase).__name__}")
        if not _is_int(max_length) or max_length < 2:
            raise ValueError(f"{where}: max_length must be an int ≥ 2 (room for [CLS] and [SEP]), got {max_length!r}")
        self.vocab = vocab                      # token → id
        self.ids_to_tokens = list(tokens)       # id → token
        self.lowercase = lowercase
        self.max_length = max_length
        self.special_tokens = tuple(t for t in SPECIAL_TOKENS if t in vocab)
        self._special_ids = frozenset(vocab[t] for t in self.special_tokens)
        # literal special tokens are cut out of the raw text first (none is a prefix of another: plain alternation)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
        self._max_piece_chars = max(len(t[len(CONTINUATION):]) if t.startswith(CONTINUATION) else len(t)
                                    for t in tokens)
        self._cache = {}  # normalised whitespace-delimited chunk → tuple of ids (a text repeats most of its words)

    @classmethod
    def from_vocab_file(cls, path, *, lowercase=True, max_length=MODEL_MAX_LENGTH):
        """Read a BERT ``vocab.txt`` (UTF-8, one token per line, id = line number) and build the tokenizer."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"WordPieceTokenizer.from_vocab_file: path must be a str or os.PathLike, "
                            f"got {type(path).__name__}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"WordPieceTokenizer.from_vocab_file: no vocabulary file at {os.fspath(path)!r}")
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n").rstrip("\r") for line in f]
        while tokens and tokens[-1] == "":  # a trailing blank line is not a token
            tokens.pop()
        return cls(tokens, lowercase=lowercase, max_length=max_length)

    # -- ids of the special tokens -------------------------------------------------------------------------------
    @property
    def vocab_size(self):
        """Number of entries in the vocabulary (30522 for BERT-base uncased and MiniLM)."""
        return len(self.ids_to_tokens)

    def __len__(self):
        return self.vocab_size

    pad_id = _token_id(PAD, "Id of ``[PAD]`` (0 in BERT's vocabulary): fills the batch rectangle, masked out of "
                            "attention.")
    unk_id = _token_id(UNK, "Id of ``[UNK]``: a word WordPiece cannot spell.")
    cls_id = _token_id(CLS, "Id of ``[CLS]``: the first token of every sequence (BERT's classification summary "
                            "position).")
    sep_id = _token_id(SEP, "Id of ``[SEP]``: ends each segment.")
    mask_id = _token_id(MASK, "Id of ``[MASK]`` (BERT's masked-LM placeholder), or ``None`` if the vocabulary has "
                              "none.")

    def __repr__(self):
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, "
                f"max_length={self.max_length})")

    # -- text → ids ----------------------------------------------------------------------------------------------
    def _chunk_ids(self, chunk):
        """Ids of one normalised whitespace-free chunk: punctuation split, then WordPiece on each word (cached)."""
        ids = self._cache.get(chunk)
        if ids is None:
            vocab = self.vocab
            ids = tuple(vocab[p] for word in split_on_punctuation(chunk)
                        for p in wordpiece(word, vocab, max_piece_chars=self._max_piece_chars))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[chunk] = ids
        return ids

    def _ids(self, text):
        """Token ids of ``text`` without [CLS]/[SEP]: special tokens kept whole, the rest basic + WordPiece."""
        ids = []
        # re.split with a capturing group alternates: text, special, text, special, ..., text
        for k, segment in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self.vocab[segment])
            elif segment:
                for chunk in normalize(segment, lowercase=self.lowercase).split():
                    ids.extend(self._chunk_ids(chunk))
        return ids

    def tokenize(self, text):
        """Token strings of ``text``, no [CLS]/[SEP] added: ``"Hello, world!"`` → ``['hello', ',', 'world', '!']``."""
        if not isinstance(text, str):
            raise TypeError(f"WordPieceTokenizer.tokenize: text must be a str, got {type(text).__name__}")
        return [self.ids_to_tokens[i] for i in self._ids(text)]

    def _check_max_length(self, max_length, n_special, where):
        lo = max(2, n_special)
        if max_length is None:
            return self.max_length
        if not _is_int(max_length) or not lo <= max_length <= self.max_length:
            raise ValueError(f"{where}: max_length must be an int between {lo} and {self.max_length} (the model's "
                             f"position limit; [CLS] and [SEP] count), got {max_length!r}")
        return max_length

    def _frame(self, a, b, max_length, truncation, add_special_tokens, what, where):
        """``[CLS] a [SEP] (b [SEP])`` with token types, truncated (longest first) or checked against max_length."""
        n_special = (2 + (b is not None)) if add_special_tokens else 0
        total = len(a) + (len(b) if b is not None else 0) + n_special
        if total > max_length:
            if not truncation:
                raise ValueError(
                    f"{where}: {what} is {total} tokens long{' with [CLS]/[SEP]' if n_special else ''}, more than "
                    f"max_length={max_length}; pass truncation=True to cut it to {max_length} tokens "
                    f"(or shorten the text)")
            budget = max_length - n_special
            if b is None:
                a = a[:budget]
            else:
                a, b = _truncate_longest_first(a, b, budget)
        if not add_special_tokens:
            return a + (b or []), [0] * len(a) + [1] * len(b or [])
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def encode(self, text, text_pair=None, *, add_special_tokens=True, max_length=None, truncation=False):
        """Token ids of ``text`` (and ``text_pair``): ``[CLS] text [SEP] (text_pair [SEP])`` as a list of ints.

        ``max_length`` (default: the model's 512) counts the special tokens; a longer sequence is an error unless
        ``truncation=True``, which drops tokens from the end (from the longer segment first for a pair).
        """
        where = "WordPieceTokenizer.encode"
        for name, t in (("text", text), ("text_pair", text_pair)):
            if not isinstance(t, str) and not (name == "text_pair" and t is None):
                raise TypeError(f"{where}: {name} must be a str{' or None' if name == 'text_pair' else ''}, "
                                f"got {type(t).__name__}")
        if not isinstance(add_special_tokens, bool) or not isinstance(truncation, bool):
            raise TypeError(f"{where}: add_special_tokens and truncation must be bools, got "
                            f"{add_special_tokens!r} and {truncation!r}")
        n_special = (2 + (text_pair is not None)) if add_special_tokens else 0
        max_length = self._check_max_length(max_length, n_special, where)
        b = None if text_pair is None else self._ids(text_pair)
        ids, _ = self._frame(self._ids(text), b, max_length, truncation, add_special_tokens, "the text", where)
        return ids

    def __call__(self, texts, *, max_length=None, truncation=False, padding=True, return_tensors="pt"):
        """Encode a batch: ``{"input_ids", "attention_mask", "token_type_ids"}``, each a ``(B, T)`` LongTensor.

        ``texts``: a list of strings, or of ``(text_a, text_b)`` tuples for sentence pairs (``token_type_ids`` is 1
        on the second segment and its ``[SEP]``). ``max_length`` (default 512) counts ``[CLS]``/``[SEP]``; longer
        sequences are an error unless ``truncation=True``. ``padding``: ``True`` pads with ``[PAD]`` to the
        longest sequence, ``"max_length"`` to ``max_length``, ``False`` not at all (only for
        ``return_tensors=None``, which returns lists of lists instead of tensors).
        """
        where = "WordPieceTokenizer"
        if isinstance(texts, str):
            raise TypeError(f"{where}: texts must be a list of strings, got a single str; wrap it in a list: "
                            f"tokenizer([text])")
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"{where}: texts must be a list of strings (or of (text_a, text_b) tuples), "
                            f"got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError(f"{where}: texts is empty; pass at least one string")
        pairs = []
        for i, t in enumerate(texts):
            if isinstance(t, str):
                pairs.append((t, None))
            elif isinstance(t, tuple) and len(t) == 2 and all(isinstance(s, str) for s in t):
                pairs.append(t)
            else:
                raise TypeError(f"{where}: texts[{i}] must be a str or a (text_a, text_b) tuple of two str, "
                                f"got {type(t).__name__} {t!r:.60}")
        if not isinstance(truncation, bool):
            raise TypeError(f"{where}: truncation must be a bool, got {truncation!r}")
        if not (isinstance(padding, bool) or padding in ("longest", "max_length")):
            raise ValueError(f"{where}: padding must be True/'longest' (to the longest sequence), 'max_length' or "
                             f"False, got {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"{where}: return_tensors must be 'pt' (torch tensors) or None (Python lists), "
                             f"got {return_tensors!r}")
        n_special = 3 if any(b is not None for _, b in pairs) else 2
        max_length = self._check_max_length(max_length, n_special, where)

        input_ids, token_type_ids = [], []
        for i, (a, b) in enumerate(pairs):
            ids, types = self._frame(self._ids(a), None if b is None else self._ids(b), max_length, truncation,
                                     True, f"texts[{i}]", where)
            input_ids.append(ids)
            token_type_ids.append(types)
        lengths = [len(ids) for ids in input_ids]
        attention_mask = [[1] * n for n in lengths]
        if padding is False:
            if return_tensors == "pt" and len(set(lengths)) > 1:
                raise ValueError(f"{where}: padding=False gives sequences of different lengths {sorted(set(lengths))}, "
                                 f"which cannot be stacked into a tensor; use padding=True or return_tensors=None")
        else:
            width = max_length if padding == "max_length" else max(lengths)
            for ids, types, mask in zip(input_ids, token_type_ids, attention_mask):
                pad = width - len(ids)
                ids += [self.pad_id] * pad   # [PAD] tokens ...
                types += [0] * pad
                mask += [0] * pad            # ... that attention must ignore
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if return_tensors == "pt":
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # (B, T) each
        return out

    # -- ids → text ----------------------------------------------------------------------------------------------
    def _check_ids(self, ids, where):
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"{where}: ids must be integer token ids, got a tensor of dtype {ids.dtype}")
            if ids.dim() != 1:
                raise ValueError(f"{where}: ids must be one sequence (1-D), got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise TypeError(f"{where}: ids must be a list of ints or a 1-D integer tensor, got {type(ids).__name__}")
        out = []
        for k, i in enumerate(ids):
            if isinstance(i, bool):
                raise TypeError(f"{where}: ids[{k}] must be an int, got bool")
            try:
                i = operator.index(i)
            except TypeError:
                raise TypeError(f"{where}: ids[{k}] must be an int, got {type(i).__name__}") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{where}: ids[{k}]={i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(i)
        return out

    def convert_ids_to_tokens(self, ids):
        """Token strings of ``ids`` (an int gives one string, a list or 1-D tensor a list)."""
        if _is_int(ids):
            return self.convert_ids_to_tokens([ids])[0]
        return [self.ids_to_tokens[i] for i in self._check_ids(ids, "WordPieceTokenizer.convert_ids_to_tokens")]

    def convert_tokens_to_ids(self, tokens):
        """Ids of vocabulary strings (``[UNK]``'s id for a string not in the vocabulary)."""
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_id)
        if not isinstance(tokens, (list, tuple)):
            raise TypeError(f"WordPieceTokenizer.convert_tokens_to_ids: tokens must be a str or a list of str, "
                            f"got {type(tokens).__name__}")
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids, *, skip_special_tokens=True):
        """Text of one sequence of ids: pieces glued (``tok ##en`` → ``token``), spaces before ``. , ! ?`` removed.

        As in Hugging Face, ``skip_special_tokens=True`` drops ``[CLS] [SEP] [PAD] [MASK]`` *and* ``[UNK]``. The text
        is the normalised one (lower-case, no accents): tokenisation is not invertible.
        """
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(f"WordPieceTokenizer.decode: skip_special_tokens must be a bool, "
                            f"got {skip_special_tokens!r}")
        ids = self._check_ids(ids, "WordPieceTokenizer.decode")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        parts = []
        for k, i in enumerate(ids):
            token = self.ids_to_tokens[i]
            if k:  # a "##" piece continues the previous word, anything else starts a new one
                token = token[len(CONTINUATION):] if token.startswith(CONTINUATION) else " " + token
            parts.append(_cleanup(token))
        return "".join(parts)

    def batch_decode(self, batch, *, skip_special_tokens=True):
        """:meth:`decode` of each row of a ``(B, T)`` tensor or list of id lists."""
        if isinstance(batch, torch.Tensor):
            if batch.dim() != 2:
                raise ValueError(f"WordPieceTokenizer.batch_decode: batch must be (B, T), "
                                 f"got shape {tuple(batch.shape)}")
            batch = list(batch)
        if not isinstance(batch, (list, tuple)):
            raise TypeError(f"WordPieceTokenizer.batch_decode: batch must be a (B, T) tensor or a list of id lists, "
                            f"got {type(batch).__name__}")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]


def _truncate_longest_first(a, b, budget):
    """Cut a pair to ``budget`` tokens in all, taking from the longer segment first (Hugging Face's LongestFirst).

    If the shorter segment fits in half the budget it is kept whole and the longer one gets the rest; otherwise
    both are cut to about half, the extra token of an odd budget going to the longer (to ``b`` on a tie).
    """
    short, long_ = sorted((len(a), len(b)))
    swap = len(a) > len(b)
    n_long = short if short > budget else max(short, budget - short)
    n_short = short
    if n_short + n_long > budget:
        n_short, n_long = budget // 2, budget // 2 + budget % 2
    n_a, n_b = (n_long, n_short) if swap else (n_short, n_long)
    return a[:n_a], b[:n_b]
