"""Tests for effedu.data: the synthetic tasks, the shipped corpus, the tokenizer and the LM batches.

Every scored target is recomputed here independently of the module (python sorted / a dict of pairs / a recursive
ListOps parser with statistics.median / bracket reduction by string replacement) and compared.
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effedu import data as D
from effedu.data import IGNORE, PAD, SEP

REPO = Path(__file__).resolve().parent.parent
ALL_TASKS = ["copy", "reverse", "sort", "recall", "listops", "brackets", "mixed"]
SEQ2SEQ = ["copy", "reverse", "sort"]


# ---------------------------------------------------------------------------------------------------------------
# Common properties of every task
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert sorted(D.TASKS) == sorted(ALL_TASKS)
    assert D.TASKS["recall"] is D.make_associative_recall
    assert all(callable(f) for f in D.TASKS.values())


@pytest.mark.parametrize("name", ALL_TASKS)
@pytest.mark.parametrize("seq_len", [7, 8, 33])
def test_shapes_dtypes_ranges(name, seq_len):
    b = D.make_task(name, 13, seq_len, seed=3)
    assert isinstance(b, D.Batch)
    inputs, targets = b  # unpacks like a tuple
    assert inputs.shape == (13, seq_len) and targets.shape == (13, seq_len)
    assert inputs.dtype == torch.long and targets.dtype == torch.long
    V = D.task_vocab_size(name)
    assert int(inputs.min()) >= 0 and int(inputs.max()) < V
    scored = targets[targets != IGNORE]
    assert scored.numel() > 0
    assert int(scored.min()) >= 0 and int(scored.max()) < V
    assert torch.equal(b.mask, targets != IGNORE)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_default_vocab_is_task_vocab_size(name):
    a = D.make_task(name, 8, 21, seed=1)
    b = D.make_task(name, 8, 21, seed=1, vocab_size=D.task_vocab_size(name))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_determinism(name):
    a = D.make_task(name, 64, 25, seed=7)
    b = D.make_task(name, 64, 25, seed=7)
    c = D.make_task(name, 64, 25, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_global_rng_neither_used_nor_disturbed(name):
    torch.manual_seed(123)
    a = D.make_task(name, 16, 19, seed=0)
    after_a = torch.rand(3)
    torch.manual_seed(999)
    b = D.make_task(name, 16, 19, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    assert torch.equal(a.inputs, b.inputs)  # independent of the global seed
    assert torch.equal(after_a, expected)  # the global stream was not advanced


@pytest.mark.parametrize("name", ALL_TASKS)
def test_cross_entropy_ignores_unscored_positions(name):
    b = D.make_task(name, 10, 17, seed=2)
    V = D.task_vocab_size(name)
    logits = torch.zeros(10, 17, V)  # uniform prediction: loss log V on each scored position
    loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE)
    assert math.isclose(loss.item(), math.log(V), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# copy / reverse / sort
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEQ2SEQ)
@pytest.mark.parametrize("seq_len", [3, 4, 17, 40])
def test_seq2seq_answers(name, seq_len):
    b = D.make_task(name, 50, seq_len, seed=11)
    k = (seq_len - 1) // 2
    for x, y in zip(b.inputs.tolist(), b.targets.tolist()):
        prompt, answer = x[:k], x[k + 1 : 2 * k + 1]
        assert all(t >= D.FIRST_SYMBOL for t in prompt)
        assert x[k] == SEP
        assert x[2 * k + 1 :] == [PAD] * (seq_len - 2 * k - 1)
        expected = {"copy": prompt, "reverse": prompt[::-1], "sort": sorted(prompt)}[name]
        assert answer == expected
        # scored exactly at positions k .. 2k-1 (SEP predicts the first answer token), IGNORE elsewhere
        assert y[k : 2 * k] == expected
        assert y[:k] == [IGNORE] * k and y[2 * k :] == [IGNORE] * (seq_len - 2 * k)


@pytest.mark.parametrize("name", SEQ2SEQ + ["recall"])
def test_next_token_alignment(name):
    b = D.make_task(name, 40, 30, seed=4)
    t_idx = (b.targets != IGNORE).nonzero()
    assert len(t_idx) > 0
    for n, t in t_idx.tolist():
        assert t + 1 < b.inputs.shape[1]
        assert b.inputs[n, t + 1] == b.targets[n, t]


def test_prompt_symbols_vary_and_use_vocab():
    b = D.make_copy(200, 41, vocab_size=7, seed=0)
    used = set(b.inputs[:, :20].flatten().tolist())
    assert used == set(range(D.FIRST_SYMBOL, 7))


# ---------------------------------------------------------------------------------------------------------------
# associative recall
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,vocab_size", [(5, 4), (6, 10), (31, 40), (64, 130)])
def test_recall_answer_is_the_paired_value(seq_len, vocab_size):
    b = D.make_associative_recall(60, seq_len, vocab_size=vocab_size, seed=5)
    keys_r, vals_r = D.recall_layout(vocab_size)
    n = (seq_len - 3) // 2
    for x, y in zip(b.inputs.tolist(), b.targets.tolist()):
        assert x[2 * n] == SEP
        ks, vs = x[0 : 2 * n : 2], x[1 : 2 * n : 2]
        assert len(set(ks)) == n  # distinct keys: the answer is unique
        assert all(k in keys_r for k in ks) and all(v in vals_r for v in vs)
        table = dict(zip(ks, vs))
        query = x[2 * n + 1]
        assert query in table
        scored = [(t, v) for t, v in enumerate(y) if v != IGNORE]
        assert scored == [(2 * n + 1, table[query])]
        assert x[2 * n + 3 :] == [PAD] * (seq_len - 2 * n - 3)


def test_recall_query_position_varies():
    b = D.make_associative_recall(300, 41, seed=0)
    n = 19
    keys = b.inputs[:, 0 : 2 * n : 2]
    which = (keys == b.inputs[:, 2 * n + 1 : 2 * n + 2]).float().argmax(1)
    assert len(set(which.tolist())) > 10  # queries ask for early and late pairs alike


def test_recall_fewer_pairs_pads_the_tail():
    b = D.make_associative_recall(5, 30, n_pairs=4, seed=0)
    assert (b.inputs[:, 11:] == PAD).all()
    assert (b.inputs[:, 8] == SEP).all()
    assert (b.targets[:, 9] != IGNORE).all()


# ---------------------------------------------------------------------------------------------------------------
# ListOps
# ---------------------------------------------------------------------------------------------------------------

_OPS = {D.LISTOPS_MAX: "MAX", D.LISTOPS_MIN: "MIN", D.LISTOPS_MED: "MED", D.LISTOPS_SM: "SM"}


def _symbols(tokens):
    out = []
    for t in tokens:
        if t in (PAD, SEP):
            continue
        if D.LISTOPS_DIGIT0 <= t < D.LISTOPS_DIGIT0 + 10:
            out.append(t - D.LISTOPS_DIGIT0)
        elif t in _OPS:
            out.append(_OPS[t])
        else:
            assert t == D.LISTOPS_CLOSE, t
            out.append("]")
    return out


def _parse(sym, i=0):
    """Recursive-descent evaluation; returns (value, next index)."""
    s = sym[i]
    if isinstance(s, int):
        return s, i + 1
    args, i = [], i + 1
    while sym[i] != "]":
        v, i = _parse(sym, i)
        args.append(v)
    f = {"MAX": max, "MIN": min, "MED": lambda a: int(statistics.median(a)), "SM": lambda a: sum(a) % 10}[s]
    return f(args), i + 1


def _independent_listops(tokens):
    sym = _symbols(tokens)
    value, end = _parse(sym)
    assert end == len(sym)
    return value


@pytest.mark.parametrize(
    "text,value",
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[SM 5 6 7 ]", 8),
        ("[MED 1 2 3 4 ]", 2),
        ("[MED 9 1 5 ]", 5),
        ("[MIN [MAX 1 2 ] 3 ]", 2),
        ("[SM [MED 8 9 ] [MAX 0 3 ] ]", 1),
        ("7", 7),
    ],
)
def test_evaluate_listops_hand_examples(text, value):
    ids = {"[MAX": D.LISTOPS_MAX, "[MIN": D.LISTOPS_MIN, "[MED": D.LISTOPS_MED, "[SM": D.LISTOPS_SM,
           "]": D.LISTOPS_CLOSE}
    tokens = [ids[w] if w in ids else D.LISTOPS_DIGIT0 + int(w) for w in text.split()]
    assert D.evaluate_listops(tokens) == value
    assert D.evaluate_listops(torch.tensor(tokens + [PAD, PAD, SEP])) == value


@pytest.mark.parametrize("bad", [[D.LISTOPS_MAX, D.LISTOPS_DIGIT0], [D.LISTOPS_CLOSE], [], [D.LISTOPS_VOCAB]])
def test_evaluate_listops_rejects_malformed(bad):
    with pytest.raises(ValueError, match="evaluate_listops"):
        D.evaluate_listops(bad)


@pytest.mark.parametrize("seq_len", [5, 6, 20, 64, 257])
def test_listops_label_equals_independent_evaluation(seq_len):
    b = D.make_listops(100, seq_len, seed=9)
    assert (b.inputs[:, -1] == SEP).all()
    assert (b.targets[:, :-1] == IGNORE).all()
    for x, label in zip(b.inputs.tolist(), b.targets[:, -1].tolist()):
        body = x[:-1]
        nonpad = [t != PAD for t in body]
        n = sum(nonpad)
        assert all(nonpad[:n]) and not any(nonpad[n:])  # the expression, then PAD only
        assert body[0] in _OPS  # the root is an operator
        assert label == _independent_listops(x)
        assert label == D.evaluate_listops(x)


def test_listops_labels_nested_and_spread():
    b = D.make_listops(1000, 64, seed=0)
    counts = torch.bincount(b.targets[:, -1], minlength=10)
    assert counts.numel() == 10 and int(counts.min()) > 50  # every class 0-9 occurs often
    depth = torch.cumsum(
        torch.isin(b.inputs, torch.tensor(D.LISTOPS_OPS)).long() - (b.inputs == D.LISTOPS_CLOSE).long(), dim=1
    )
    assert int(depth.max()) >= 4 and int(depth.min()) == 0  # really nested, and every bracket is closed
    assert int((depth[:, -1] == 0).sum()) == 1000


# ---------------------------------------------------------------------------------------------------------------
# Brackets
# ---------------------------------------------------------------------------------------------------------------


def _independent_balanced(tokens, n_types=2):
    chars = "()[]{}<>"
    s = "".join(chars[t - D.BRACKET_OPEN0] for t in tokens if t not in (PAD, SEP))
    pairs = [chars[2 * i : 2 * i + 2] for i in range(n_types)]
    while any(p in s for p in pairs):
        for p in pairs:
            s = s.replace(p, "")
    return s == ""


@pytest.mark.parametrize("n_types", [1, 2, 3])
def test_brackets_label_equals_independent_check(n_types):
    b = D.make_brackets(1000, 32, n_types=n_types, seed=1)
    assert int(b.inputs.max()) < D.BRACKET_OPEN0 + 2 * n_types
    assert (b.inputs[:, -1] == SEP).all() and (b.targets[:, :-1] == IGNORE).all()
    labels = b.targets[:, -1].tolist()
    for x, label in zip(b.inputs.tolist(), labels):
        assert label == int(_independent_balanced(x, n_types))
        assert label == int(D.is_balanced(x, n_types))
    frac = sum(labels) / len(labels)
    assert 0.4 < frac < 0.6, frac


def test_brackets_negatives_are_near_misses():
    b = D.make_brackets(1000, 40, seed=2)
    body = b.inputs[:, :-1]
    lengths = (body != PAD).sum(1)
    assert (lengths % 2 == 0).all()  # the length never gives the answer away
    opens = ((body >= D.BRACKET_OPEN0) & ((body - D.BRACKET_OPEN0) % 2 == 0)).sum(1)
    neg = b.targets[:, -1] == 0
    # many unbalanced strings have as many opening as closing brackets: counting alone is not enough
    assert int((neg & (2 * opens == lengths)).sum()) > 100
    # and some have, for every type, as many openings as closings: only the order (the stack) is wrong
    per_type_equal = torch.ones_like(neg)
    for kind in range(2):
        o = (body == D.BRACKET_OPEN0 + 2 * kind).sum(1)
        c = (body == D.BRACKET_OPEN0 + 2 * kind + 1).sum(1)
        per_type_equal &= o == c
    assert int((neg & per_type_equal).sum()) > 50
    # lengths vary
    assert len(set(lengths.tolist())) > 5


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
@pytest.mark.parametrize("n_samples", [0, -3])
def test_bad_n_samples(name, n_samples):
    with pytest.raises(ValueError, match="n_samples"):
        D.make_task(name, n_samples, 20)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_non_int_arguments(name):
    with pytest.raises(TypeError, match="n_samples"):
        D.make_task(name, 2.5, 20)
    with pytest.raises(TypeError, match="seq_len"):
        D.make_task(name, 2, "20")
    with pytest.raises(TypeError, match="seed"):
        D.make_task(name, 2, 20, seed=1.0)
    with pytest.raises(ValueError, match="seed"):
        D.make_task(name, 2, 20, seed=-1)


@pytest.mark.parametrize("name,minimum", [("copy", 3), ("reverse", 3), ("sort", 3), ("recall", 5),
                                          ("listops", 5), ("brackets", 3)])
def test_seq_len_too_small(name, minimum):
    for too_short in (1, minimum - 1):
        with pytest.raises(ValueError, match=rf"seq_len must be >= {minimum} .*got {too_short}"):
            D.make_task(name, 2, too_short)
    b = D.make_task(name, 2, minimum)  # the minimum itself works and scores something
    assert (b.targets != IGNORE).any()


@pytest.mark.parametrize("name,too_small", [("copy", 3), ("sort", 2), ("recall", 3), ("listops", 16),
                                            ("brackets", 5)])
def test_vocab_too_small(name, too_small):
    with pytest.raises(ValueError, match="vocab_size must be >= .*got " + str(too_small)):
        D.make_task(name, 2, 20, vocab_size=too_small)


def test_recall_more_pairs_than_keys():
    with pytest.raises(ValueError, match="vocab_size=10 gives only 4 distinct keys"):
        D.make_associative_recall(2, 40, vocab_size=10)
    with pytest.raises(ValueError, match="n_pairs"):
        D.make_associative_recall(2, 40, vocab_size=10, n_pairs=5)
    with pytest.raises(ValueError, match="n_pairs"):
        D.make_associative_recall(2, 11, n_pairs=5)


def test_unknown_task_name():
    with pytest.raises(ValueError, match="unknown task name 'needle'.*copy, reverse, sort, recall, listops"):
        D.make_task("needle", 2, 10)
    with pytest.raises(ValueError, match="unknown task name"):
        D.task_vocab_size("Copy")
    with pytest.raises(TypeError, match="name"):
        D.make_task(3, 2, 10)


def test_to_text_renders_tasks():
    assert D.to_text("copy", [3, 2, 1, 2, 3, 0]) == "1 0 | 0 1 _"
    assert D.to_text("listops", [D.LISTOPS_MAX, 2, 11, D.LISTOPS_CLOSE, SEP]) == "[MAX 0 9 ] |"
    assert D.to_text("brackets", [2, 4, 5, 3, 0, 1]) == "( [ ] ) _ |"


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------


def test_generate_corpus_deterministic_and_seeded():
    a = D.generate_corpus(200, seed=0)
    assert a == D.generate_corpus(200, seed=0)
    assert a != D.generate_corpus(200, seed=1)
    assert D.generate_corpus().startswith(a.split("\n")[0])  # a prefix of the default corpus, same stream


def test_shipped_file_equals_generate_corpus_byte_for_byte():
    path = REPO / "data" / "tiny_corpus.txt"
    assert path == D.DEFAULT_CORPUS_PATH
    shipped = path.read_bytes()
    assert shipped == D.generate_corpus().encode("utf-8")
    assert 150_000 <= len(shipped) <= 250_000
    assert D.load_corpus() == shipped.decode("utf-8")


def test_data_readme_recipe_matches_code():
    readme = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    assert "python -m effedu.data --regenerate" in readme
    assert f"generate_corpus(n_sentences={D.DEFAULT_N_SENTENCES}, seed=0)" in readme
    assert f"{len(D.generate_corpus().encode()):,} bytes" in readme
    assert "MIT" in readme
    listed = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    data = REPO / "data"
    shipped = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file() and p.name != "README.md"}
    assert listed == shipped  # one line per file in data/ (sub-folders included: results/<chapter>.json)


def test_corpus_structure():
    text = D.load_corpus()
    lines = text.split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # one paragraph per line, ends with a newline
    for line in lines[:-1]:
        assert line.count('"') % 2 == 0  # every quote that opens closes
        assert line.count("(") == line.count(")")
        assert line[-1] in '.?!"', line[-20:]
    words = re.findall(r"[a-z]+", text.lower())
    assert 200 <= len(set(words)) <= 1000  # a few hundred words
    for bad in (" they is ", " he are ", " she were ", " he have ", " a apple", " an cat"):
        assert bad not in text.lower()
    assert "\r" not in text and text.isascii()


def test_regenerate_cli_and_write_corpus(tmp_path):
    out = tmp_path / "corpus.txt"
    D.cli.main(["--regenerate", "--out", str(out)])
    assert out.read_bytes() == (REPO / "data" / "tiny_corpus.txt").read_bytes()
    small = D.write_corpus(tmp_path / "sub" / "small.txt", n_sentences=50, seed=3)
    assert D.load_corpus(small) == D.generate_corpus(50, seed=3)


def test_load_corpus_missing_file_warns_and_regenerates(tmp_path):
    with pytest.warns(UserWarning, match="not found; regenerating"):
        text = D.load_corpus(tmp_path / "nope.txt")
    assert text == D.generate_corpus()


def test_generate_corpus_bad_args():
    with pytest.raises(ValueError, match="n_sentences"):
        D.generate_corpus(0)
    with pytest.raises(TypeError, match="seed"):
        D.generate_corpus(10, seed="0")
    with pytest.raises(TypeError, match="path"):
        D.load_corpus(3)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, LM batches, split
# ---------------------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip():
    text = D.load_corpus()
    tok = D.corpus_tokenizer()
    assert tok.vocab_size == len(set(text)) == len(tok.itos) == len(tok.stoi)
    assert all(tok.stoi[c] == i for i, c in enumerate(tok.itos))
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert int(ids.min()) == 0 and int(ids.max()) == tok.vocab_size - 1
    assert tok.decode(ids) == text
    assert tok.decode(ids[:50].tolist()) == text[:50]


def test_char_tokenizer_errors():
    tok = D.CharTokenizer("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(TypeError, match="text"):
        D.CharTokenizer(b"abc")
    with pytest.raises(ValueError, match="empty"):
        D.CharTokenizer("")


def test_lm_batch_windows_and_alignment():
    tokens = torch.arange(1000)  # window contents reveal where they were cut
    b = D.lm_batch(tokens, 16, 32, seed=1)
    assert b.inputs.shape == (16, 32) and b.targets.shape == (16, 32)
    assert b.inputs.dtype == torch.long
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    starts = b.inputs[:, :1]
    assert torch.equal(b.inputs, starts + torch.arange(32))  # contiguous windows
    assert torch.equal(b.targets, b.inputs + 1)  # targets = the next token
    assert int(b.targets.max()) <= 999
    assert torch.equal(D.lm_batch(tokens, 16, 32, seed=1).inputs, b.inputs)
    assert not torch.equal(D.lm_batch(tokens, 16, 32, seed=2).inputs, b.inputs)
    edge = D.lm_batch(torch.arange(33), 4, 32, seed=0)  # exactly one window fits
    assert torch.equal(edge.inputs, torch.arange(32).expand(4, 32))


def test_lm_batch_on_the_corpus_and_errors():
    tok = D.corpus_tokenizer()
    ids = tok.encode(D.load_corpus())
    b = D.lm_batch(ids, 4, 64, seed=0)
    text = D.load_corpus()
    for x, y in zip(b.inputs, b.targets):
        s = tok.decode(x)
        assert s in text and (s + tok.decode(y)[-1]) in text
    with pytest.raises(ValueError, match="seq_len"):
        D.lm_batch(torch.arange(10), 2, 10)
    with pytest.raises(TypeError, match="tokens"):
        D.lm_batch(torch.arange(10).float(), 2, 4)
    with pytest.raises(ValueError, match="batch_size"):
        D.lm_batch(torch.arange(10), 0, 4)


def test_train_val_split():
    tokens = torch.arange(1000)
    tr, va = D.train_val_split(tokens, 0.1)
    assert len(tr) == 900 and len(va) == 100
    assert torch.equal(torch.cat([tr, va]), tokens)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            D.train_val_split(tokens, bad)
    with pytest.raises(ValueError, match="empty"):
        D.train_val_split(torch.arange(3), 0.01)
