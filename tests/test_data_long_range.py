"""Tests for effedu.data.long_range: the needle, long recall, long ListOps and byte-level text tasks.

Every label is recomputed here independently of the generator: the needle and recall by scanning the sequence for
the query key, ListOps by a recursive-descent parser with statistics.median (and by evaluate_listops), text by
regenerating the labelled-sentence pool with the corpus's public generator and recounting the majority.
"""
from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch

from effedu.data import IGNORE, PAD, SEP, evaluate_listops, generate_labelled_sentences
from effedu.data import long_range as LR
from effedu.data.tasks import LISTOPS_CLOSE, LISTOPS_DIGIT0, LISTOPS_MAX, LISTOPS_MED, LISTOPS_MIN, LISTOPS_SM

TASKS = LR.LONG_RANGE_TASKS


def _check_convention(b, name, seq_len, n):
    info = LR.long_range_info(name)
    assert b.inputs.shape == (n, seq_len) and b.targets.shape == (n, seq_len)
    assert b.inputs.dtype == torch.long and b.targets.dtype == torch.long
    assert (b.inputs[:, -1] == SEP).all()
    assert (b.targets[:, :-1] == IGNORE).all()
    assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < info["vocab_size"]
    labels = b.targets[:, -1]
    assert int(labels.min()) >= 0 and int(labels.max()) < info["num_classes"]


# ---------------------------------------------------------------------------------------------------------------
# Common properties
# ---------------------------------------------------------------------------------------------------------------


def test_names_and_info():
    assert TASKS == ("needle", "recall", "listops", "text")
    for name in TASKS:
        info = LR.long_range_info(name)
        assert set(info) == {"vocab_size", "num_classes", "chance", "description"}
        assert 0 < info["chance"] < 1 and isinstance(info["description"], str)
        assert info["chance"] >= 1 / info["num_classes"] - 1e-12
    assert LR.long_range_info("needle")["chance"] == 0.1
    assert LR.long_range_info("text", label="tense")["num_classes"] == 2
    assert LR.long_range_info("needle", n_keys=4, n_values=3)["vocab_size"] == 2 + 4 + 3


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_shapes_and_convention(name, seq_len):
    n = 8 if seq_len == 4096 else 16
    b = LR.make_long_range(name, n, seq_len, seed=1)
    _check_convention(b, name, seq_len, n)


@pytest.mark.parametrize("name", TASKS)
def test_determinism_and_seed(name):
    a = LR.make_long_range(name, 16, 300, seed=5)
    b = LR.make_long_range(name, 16, 300, seed=5)
    c = LR.make_long_range(name, 16, 300, seed=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", TASKS)
def test_global_rng_untouched(name):
    torch.manual_seed(0)
    a = LR.make_long_range(name, 4, 256, seed=0)
    after = torch.rand(2)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(1)
    b = LR.make_long_range(name, 4, 256, seed=0)
    assert torch.equal(after, expected) and torch.equal(a.inputs, b.inputs)


@pytest.mark.parametrize("name,tol", [("needle", 0.35), ("recall", 0.35), ("text", 0.35)])
def test_uniform_class_balance(name, tol):
    info = LR.long_range_info(name)
    labels = LR.make_long_range(name, 800, 256, seed=2).targets[:, -1]
    rate = torch.bincount(labels, minlength=info["num_classes"]).float() / len(labels)
    assert (rate - info["chance"]).abs().max() < tol * info["chance"]  # every class near 1/C


def test_listops_class_balance_and_stated_chance():
    labels = LR.make_long_listops(2000, 512, seed=0).targets[:, -1]
    rate = torch.bincount(labels, minlength=10).float() / len(labels)
    assert (rate > 0.02).all()  # every value occurs
    assert abs(float(rate.max()) - LR.long_range_info("listops")["chance"]) < 0.05  # the stated chance is honest


# ---------------------------------------------------------------------------------------------------------------
# Needle and recall: scan for the query key
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,depth", [(256, None), (1024, 0.25), (4096, 0.05), (9, 1.0)])
def test_needle_label_by_scanning_and_early(seq_len, depth):
    n_keys, n_values = 8, 5
    b = LR.make_needle(40, seq_len, n_keys=n_keys, n_values=n_values, depth=depth, seed=3)
    depth = 0.1 if depth is None else depth
    for x, y in zip(b.inputs.tolist(), b.targets[:, -1].tolist()):
        q = x[-2]
        assert 2 <= q < 2 + n_keys
        hits = [t for t in range(len(x) - 2) if x[t] == q]
        assert len(hits) == 1  # the query key occurs exactly once before it
        t = hits[0]
        assert t % 2 == 0 and t + 1 < depth * seq_len  # the needle pair lies in the first `depth` fraction
        assert x[t + 1] - 2 - n_keys == y  # the label is the needle's value
        assert all(x[i] - 2 < n_keys for i in range(0, 2 * ((seq_len - 2) // 2), 2))  # keys at even positions


def test_needle_position_varies_and_end_is_uninformative():
    b = LR.make_needle(500, 1000, seed=0)
    pos = (b.inputs[:, :-2] == b.inputs[:, -2:-1]).float().argmax(1)
    assert pos.unique().numel() > 20 and int(pos.max()) < 100
    # the value just before the query says nothing about the label
    last_val = b.inputs[:, -3] - 2 - 32
    assert (last_val == b.targets[:, -1]).float().mean() < 0.2


@pytest.mark.parametrize("seq_len,n_pairs", [(256, None), (1024, 100), (4096, None)])
def test_long_recall_label_by_scanning(seq_len, n_pairs):
    b = LR.make_long_recall(20, seq_len, n_pairs=n_pairs, seed=4)
    n_keys = 2048
    n = (seq_len - 2) // 2 if n_pairs is None else n_pairs
    for x, y in zip(b.inputs.tolist(), b.targets[:, -1].tolist()):
        ks, vs = x[0 : 2 * n : 2], x[1 : 2 * n : 2]
        assert len(set(ks)) == n and all(2 <= k < 2 + n_keys for k in ks)
        assert x[2 * n : -2] == [PAD] * (seq_len - 2 - 2 * n)
        table = dict(zip(ks, vs))
        assert table[x[-2]] - 2 - n_keys == y


def test_recall_query_anywhere():
    b = LR.make_long_recall(400, 512, seed=0)
    pos = (b.inputs[:, :-2] == b.inputs[:, -2:-1]).float().argmax(1)
    assert float(pos.float().mean()) > 150 and int(pos.max()) > 400


# ---------------------------------------------------------------------------------------------------------------
# ListOps: an independent recursive parser
# ---------------------------------------------------------------------------------------------------------------

_OPS = {LISTOPS_MAX: max, LISTOPS_MIN: min, LISTOPS_MED: lambda a: int(statistics.median(a)),
        LISTOPS_SM: lambda a: sum(a) % 10}


def _parse(x, i):
    t = x[i]
    if LISTOPS_DIGIT0 <= t < LISTOPS_DIGIT0 + 10:
        return t - LISTOPS_DIGIT0, i + 1, 0
    args, i, depth = [], i + 1, 0
    while x[i] != LISTOPS_CLOSE:
        v, i, d = _parse(x, i)
        args.append(v)
        depth = max(depth, d)
    assert 2 <= len(args) <= 10
    return _OPS[t](args), i + 1, depth + 1


def test_listops_hand_example():
    # [SM [MED 8 9 ] [MAX 0 3 ] 7 ] = (8 + 3 + 7) % 10 = 8
    x = [LISTOPS_SM, LISTOPS_MED, 10, 11, LISTOPS_CLOSE, LISTOPS_MAX, 2, 5, LISTOPS_CLOSE, 9, LISTOPS_CLOSE]
    assert _parse(x, 0)[0] == 8 == evaluate_listops(x)


@pytest.mark.parametrize("seq_len", [5, 64, 256, 1024, 4096])
def test_long_listops_label_equals_independent_evaluation(seq_len):
    n = 12 if seq_len == 4096 else 60
    b = LR.make_long_listops(n, seq_len, seed=seq_len)
    for x, y in zip(b.inputs.tolist(), b.targets[:, -1].tolist()):
        body = x[:-1]
        m = sum(t != PAD for t in body)
        assert all(t != PAD for t in body[:m]) and all(t == PAD for t in body[m:])
        assert m >= seq_len / 2  # LRA-like lengths: at least half the sequence
        value, end, depth = _parse(body[:m], 0)
        assert end == m and depth <= 10
        assert value == y == evaluate_listops(body[:m])


def test_long_listops_deep_and_wide():
    b = LR.make_long_listops(50, 2048, seed=0)
    opens = torch.isin(b.inputs, torch.tensor(list(_OPS))).long()
    depth = torch.cumsum(opens - (b.inputs == LISTOPS_CLOSE).long(), 1)
    assert int(depth.max()) == 10 and int(depth.min()) == 0


# ---------------------------------------------------------------------------------------------------------------
# Text: regenerate the sentence pool, recount the majority, decode the bytes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label,seq_len", [("kind", 512), ("tense", 1024), ("kind", 4096)])
def test_text_labels_recounted(label, seq_len):
    n = 6 if seq_len == 4096 else 24
    b = LR.make_text_classification(n, seq_len, label=label, seed=7)
    passages, labels, kinds, names = LR.text_passages(n, seq_len, label=label, seed=7)
    pool_n = max(64 * len(names), min(8192, n * seq_len // 50))
    texts, labs, _ = generate_labelled_sentences(pool_n, 7, label=label)
    truth = dict(zip(texts, labs))
    for row, y, sents, ks in zip(b.inputs.tolist(), b.targets[:, -1].tolist(), passages, kinds):
        assert [truth[s] for s in sents] == ks  # every sentence comes from the pool, with its generator label
        counts = Counter(ks)
        top, c = counts.most_common(1)[0]
        assert top == y and 2 * c > len(ks)  # strict majority
        text = bytes(t - 2 for t in row[:-1] if t != PAD).decode("utf-8")
        assert text == " ".join(sents)
        assert len(text) + 1 <= seq_len and len(text) > seq_len - 1 - 300  # whole sentences fill the passage
    assert labels == b.targets[:, -1].tolist()


def test_text_is_not_decided_by_one_sentence():
    _, labels, kinds, _ = LR.text_passages(200, 1024, seed=0)
    other = sum(sum(k != y for k in ks) for ks, y in zip(kinds, labels))
    total = sum(len(ks) for ks in kinds)
    assert 0.3 < other / total < 0.5  # about 40 % of the sentences are of other kinds (purity 0.6)
    firsts = sum(ks[0] == y for ks, y in zip(kinds, labels)) / len(labels)
    assert firsts < 0.8  # the first sentence alone is often wrong
    pure = LR.text_passages(20, 512, purity=1.0, seed=0)
    assert all(set(ks) == {y} for ks, y in zip(pure[2], pure[1]))


def test_to_text():
    b = LR.make_needle(1, 24, n_keys=4, n_values=3, depth=0.25, seed=0)
    assert LR.long_range_to_text("needle", b.inputs[0], n_keys=4) == (
        "k1 v1 k2 v2 k0 v0 k2 v0 k2 v2 k2 v0 k1 v2 k3 v2 k3 v2 k1 v2 k1 v2 k0 |")
    assert LR.long_range_to_text("listops", [LISTOPS_MAX, 2, 11, LISTOPS_CLOSE, PAD, SEP]) == "[MAX 0 9 ] _ |"
    t = LR.long_range_to_text("text", LR.make_text_classification(1, 200, seed=0).inputs[0])
    assert t.endswith("|") and t[0].isupper() and "_" in t
    assert LR.long_range_to_text("recall", [2, 2050, 0, 2, 1]) == "k0 v0 _ k0 |"


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,too_short", [("needle", 3), ("recall", 3), ("listops", 4), ("text", 100)])
def test_seq_len_too_short(name, too_short):
    with pytest.raises(ValueError, match="seq_len must be >="):
        LR.make_long_range(name, 2, too_short)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown long-range task name 'needles'"):
        LR.make_long_range("needles", 2, 256)
    with pytest.raises(ValueError, match="long-range task name"):
        LR.long_range_info("copy")
    with pytest.raises(TypeError, match="long-range task name"):
        LR.long_range_to_text(3, [])
    with pytest.raises(ValueError, match="unknown label 'topic'"):
        LR.make_text_classification(2, 256, label="topic")
    with pytest.raises(ValueError, match="purity"):
        LR.make_text_classification(2, 256, purity=0.5)
    with pytest.raises(ValueError, match="depth"):
        LR.make_needle(2, 256, depth=0.0)
    with pytest.raises(ValueError, match="depth \\* seq_len"):
        LR.make_needle(2, 10, depth=0.1)
    with pytest.raises(ValueError, match="n_values"):
        LR.make_needle(2, 256, n_values=1)
    with pytest.raises(ValueError, match="n_keys"):
        LR.make_needle(2, 256, n_keys=1)
    with pytest.raises(ValueError, match="n_pairs must be <= n_keys"):
        LR.make_long_recall(2, 256, n_keys=10, n_pairs=20)
    with pytest.raises(ValueError, match="n_pairs must be <= \\(seq_len - 2\\) // 2"):
        LR.make_long_recall(2, 256, n_pairs=200)
    with pytest.raises(ValueError, match="max_args"):
        LR.make_long_listops(2, 256, max_args=1)
    with pytest.raises(ValueError, match="max_depth=2 and max_args=3 cannot"):
        LR.make_long_listops(2, 256, max_depth=2, max_args=3)
    with pytest.raises(ValueError, match="leaf_p"):
        LR.make_long_listops(2, 256, leaf_p=1.0)
    with pytest.raises(TypeError, match="n_samples"):
        LR.make_needle(2.0, 256)
    with pytest.raises(ValueError, match="seed"):
        LR.make_long_recall(2, 256, seed=-1)


def test_trains_with_the_course_loop():
    from effedu.model import Transformer, TransformerConfig
    from effedu.train import train

    info = LR.long_range_info("needle", n_keys=8, n_values=4)
    b = LR.make_needle(32, 64, n_keys=8, n_values=4, seed=0)
    model = Transformer(TransformerConfig(vocab_size=info["vocab_size"], d_model=32, n_heads=2, n_layers=1,
                                          max_len=64))
    hist = train(model, b, steps=3, lr=1e-3, progress=False)
    assert len(hist["loss"]) == 3 and all(torch.isfinite(torch.tensor(hist["loss"])))


@pytest.mark.parametrize("seq_len, depth", [(128, 0.25), (1024, 0.1), (257, 0.5)])
def test_one_hop_needle_is_the_only_value_token_early_and_is_the_label(seq_len, depth):
    n_keys, n_values = 16, 8
    b = LR.make_needle(300, seq_len, n_keys=n_keys, n_values=n_values, depth=depth, hops=1, seed=3)
    first_value = LR.FIRST_KEY + n_keys
    assert b.inputs.shape == b.targets.shape == (300, seq_len)
    assert (b.inputs[:, -1] == SEP).all() and (b.targets[:, :-1] == IGNORE).all()
    for row, label in zip(b.inputs.tolist(), b.targets[:, -1].tolist()):
        values = [(i, t) for i, t in enumerate(row[:-1]) if t >= first_value]  # the oracle: scan for value tokens
        assert len(values) == 1, "exactly one value token (the needle)"
        (pos, tok), = values
        assert pos < depth * seq_len and tok - first_value == label
        assert all(LR.FIRST_KEY <= t < first_value for t in row[:pos] + row[pos + 1:-1])
    counts = Counter(b.targets[:, -1].tolist())
    assert set(counts) == set(range(n_values)) and max(counts.values()) < 300 * 0.25
    again = LR.make_needle(300, seq_len, n_keys=n_keys, n_values=n_values, depth=depth, hops=1, seed=3)
    assert torch.equal(again.inputs, b.inputs)


@pytest.mark.parametrize("hops", [0, 3, True, 1.0])
def test_needle_hops_must_be_one_or_two(hops):
    with pytest.raises(ValueError, match="hops must be 1"):
        LR.make_needle(2, 64, hops=hops)
