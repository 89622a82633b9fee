"""Long-range tasks: four sequence-classification tasks at 256–4096 tokens where long context *matters*.

The short tasks of :mod:`effedu.data.tasks` fit in a few dozen tokens; a local window or a low-rank summary can
often solve them. Chapters 16 (learned sparse attention), 20 (architectural change) and the capstone need tasks
whose answer sits *far* from where it is asked for, at lengths where dense attention starts to hurt. All four
follow the ListOps/brackets convention of :mod:`effedu.data.tasks`:

* ``Batch(inputs (N, L) long, targets (N, L) long)``; ``targets == IGNORE`` everywhere except the LAST position,
  which holds the **class index** (0 … ``num_classes - 1``, not a token id; it is below every vocabulary size, so
  an LM head of ``vocab_size`` outputs works, as does a classification head);
* the last input token is ``SEP`` (the "answer now" marker, a CLS at the end so that a causal model has read
  everything), so ``effedu.train.train`` trains on them as they are.

The tasks (``LONG_RANGE_TASKS``; ``make_long_range(name, ...)`` dispatches, ``long_range_info(name)`` tells the
vocabulary, the classes, the chance level):

``needle`` — a key–value *needle* early in a haystack, asked for at the end:
    ``k v k v … k* v* … k v k v [_] k* |``. The haystack is key–value pairs whose keys are drawn from every key
    *but* ``k*``, so ``k*`` occurs exactly once before the query; the needle pair lies in the first ``depth``
    fraction of the sequence (default 10 %). The tokens near the end are unrelated pairs: the label (``v*``) is
    readable only at the needle, thousands of positions back. Chance: ``1 / n_values``.

``recall`` — associative recall at length: ``k_1 v_1 … k_n v_n [_ …] q |`` with n *distinct* keys (from
    ``n_keys``) and values in ``0 … n_values - 1``; ``q`` is one of the keys, picked uniformly, so the answer may
    sit anywhere in the sequence; the model must keep (or look up) every pair. Chance: ``1 / n_values``.

``listops`` — Long Range Arena's ListOps (Tay et al. 2021; Nangia & Bowman 2018): prefix expressions over
    digits with MAX, MIN, MED and SUM_MOD (``[SM``), up to ``max_depth = 10`` levels and ``max_args = 10``
    arguments (LRA's settings), of length in ``[seq_len / 2, seq_len - 1]``; ``expression [_ …] |``. The label
    is :func:`effedu.data.tasks.evaluate_listops` of the expression (the same exact evaluator as the short task).
    The classes are *not* balanced (a MAX or MIN of ten values is often 9 or 0): the honest chance level is the
    majority-class rate, 0.17–0.20 from length 256 to 4096 (``long_range_info("listops")["chance"]`` = 0.18).

``text`` — **byte-level** text classification (LRA's "Text" task, on the corpus grammar instead of IMDb):
    a passage of corpus sentences, UTF-8 bytes shifted by ``N_SPECIAL`` (vocabulary 256 + 2), filling
    ``seq_len - 1`` bytes at most (whole sentences, then ``PAD``), ``SEP`` last. With ``label="kind"`` (8 classes,
    :data:`effedu.data.corpus.SENTENCE_KINDS`) a fraction ``purity`` (default 0.6) of the sentences comes from
    the labelled kind and the rest from the other kinds, shuffled: the label is the passage's *majority* kind,
    which no single sentence decides. ``label="tense"``: the same with present/past (2 classes). Labels are
    drawn uniformly: chance ``1 / 8`` (kind) or ``1 / 2`` (tense).

Fast: 512 samples at ``seq_len = 4096`` in well under 2 s each (vectorised torch for needle/recall; a numba loop
for ListOps, compiled once and cached; a sentence pool for text). Deterministic: a local ``torch.Generator``
(and the corpus's local ``random.Random``), never a global RNG; the same seed gives the same batch.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .._checks import check_choice, check_positive_int, check_seed
from ..model import IGNORE
from .corpus import SENTENCE_KINDS, generate_labelled_sentences
from .tasks import (
    LISTOPS_CLOSE,
    LISTOPS_DIGIT0,
    LISTOPS_MAX,
    LISTOPS_MED,
    LISTOPS_MIN,
    LISTOPS_OPS,
    LISTOPS_VOCAB,
    N_SPECIAL,
    PAD,
    SEP,
    Batch,
    to_text,
)

LONG_RANGE_TASKS: tuple = ("needle", "recall", "listops", "text")

FIRST_KEY = N_SPECIAL  # needle/recall: key i has id FIRST_KEY + i; value j has id FIRST_KEY + n_keys + j
BYTE0 = N_SPECIAL  # text: byte b has id BYTE0 + b
TEXT_VOCAB = 256 + N_SPECIAL
TEXT_LABELS = {"kind": tuple(SENTENCE_KINDS), "tense": ("present", "past")}
LISTOPS_CHANCE = 0.18  # majority-class rate (label 9) of make_long_listops at the defaults: 0.17-0.20 for L = 256-4096

_NEEDLE_DEFAULTS = {"n_values": 10, "n_keys": 32}
_RECALL_DEFAULTS = {"n_values": 10, "n_keys": 2048}


def _where_seq_len(where, seq_len, minimum, why):
    check_positive_int(seq_len, "seq_len", where)
    if seq_len < minimum:
        raise ValueError(f"{where}: seq_len must be >= {minimum} ({why}), got {seq_len}")


def _check_at_least(value, name, where, minimum):
    check_positive_int(value, name, where)
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value}")
    return value


def _classify(n_samples, seq_len):
    """Empty (N, L) inputs (PAD) and targets (IGNORE)."""
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    return inputs, targets


# --------------------------------------------------------------------------------------------------------------
# Needle in a haystack
# --------------------------------------------------------------------------------------------------------------


def make_needle(n_samples: int, seq_len: int, *, n_values: int = 10, n_keys: int | None = None,
                depth: float | None = None, hops: int = 2, seed: int = 0) -> Batch:
    """A key–value needle in the first ``depth`` fraction of a haystack of other keys' pairs; asked for at the end.

    Layout (``H = seq_len - 2`` haystack positions, pairs at even offsets, one PAD when ``H`` is odd)::

        k v k v … k* v* … k v k v [_]  k*  SEP        label = v*  (class index 0 … n_values - 1)

    Key ``i`` has token id ``2 + i`` (``0 ≤ i < n_keys``, default 32), value ``j`` has id ``2 + n_keys + j``.
    The needle pair ``(k*, v*)`` sits at a uniform pair slot whose value lies before ``depth · seq_len``
    (``depth`` default 0.1); every other pair has a key drawn uniformly from the keys *other than* ``k*`` and a
    uniform value. So ``k*`` occurs exactly once before the query, and the answer is readable nowhere else.
    Chance: ``1 / n_values``. Vocabulary ``2 + n_keys + n_values``. Example (``long_range_to_text``)::

        >>> b = make_needle(1, 24, n_keys=4, n_values=3, depth=0.25, seed=0)
        >>> long_range_to_text("needle", b.inputs[0], n_keys=4)  # needle k0 v0 at positions 4-5, k0 asked at the end
        'k1 v1 k2 v2 k0 v0 k2 v0 k2 v2 k2 v0 k1 v2 k3 v2 k3 v2 k1 v2 k1 v2 k0 |'
        >>> int(b.targets[0, -1])
        0

    ``hops=1`` is the easier needle (one hop: *find the odd token out*): the haystack is key tokens only, drawn
    uniformly, and the needle is one *value* token — the only one in the sequence — in the first ``depth``
    fraction; the last position (SEP) asks for it. A single attention layer can solve it by content alone, as long
    as the query can see the needle: the task of chapters 16 and 20, where small models must learn within a short
    budget. The default ``hops=2`` (find the key asked for, then read the value after it) needs two layers composing
    (an induction circuit) and many more steps.
    """
    where = "make_needle"
    if isinstance(hops, bool) or not isinstance(hops, int) or hops not in (1, 2):
        raise ValueError(f"{where}: hops must be 1 (a lone value token) or 2 (a key asked for, then its value), "
                         f"got {hops!r}")
    check_positive_int(n_samples, "n_samples", where)
    _where_seq_len(where, seq_len, 4, "one key-value pair, the query key and SEP")
    _check_at_least(n_values, "n_values", where, 2)
    n_keys = _NEEDLE_DEFAULTS["n_keys"] if n_keys is None else _check_at_least(n_keys, "n_keys", where, 2)
    if depth is None:
        depth = 0.1
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 < depth <= 1.0:
        raise ValueError(f"{where}: depth must be a fraction in (0, 1], got {depth!r}")
    check_seed(seed, where)
    if hops == 1:
        n_early = min(seq_len - 1, int(depth * seq_len))
        if n_early < 1:
            raise ValueError(f"{where}: depth * seq_len must be >= 1 to hold the needle, got depth={depth} and "
                             f"seq_len={seq_len}")
        g = torch.Generator().manual_seed(seed)
        N = n_samples
        inputs, targets = _classify(N, seq_len)
        inputs[:, :-1] = FIRST_KEY + torch.randint(0, n_keys, (N, seq_len - 1), generator=g)
        needle_val = torch.randint(0, n_values, (N,), generator=g)
        pos = torch.randint(0, n_early, (N,), generator=g)
        inputs[torch.arange(N), pos] = FIRST_KEY + n_keys + needle_val
        inputs[:, -1] = SEP
        targets[:, -1] = needle_val
        return Batch(inputs, targets)
    n_slots = (seq_len - 2) // 2
    n_early = min(n_slots, int(depth * seq_len) // 2)  # slot s holds positions 2s, 2s+1 < depth * seq_len
    if n_early < 1:
        raise ValueError(f"{where}: depth * seq_len must be >= 2 to hold the needle pair, got depth={depth} and "
                         f"seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    N = n_samples
    needle_key = torch.randint(0, n_keys, (N, 1), generator=g)
    needle_val = torch.randint(0, n_values, (N, 1), generator=g)
    slot = torch.randint(0, n_early, (N, 1), generator=g)
    keys = torch.randint(0, n_keys - 1, (N, n_slots), generator=g)
    keys = keys + (keys >= needle_key).long()  # every key but the needle's
    vals = torch.randint(0, n_values, (N, n_slots), generator=g)
    keys.scatter_(1, slot, needle_key)
    vals.scatter_(1, slot, needle_val)
    inputs, targets = _classify(N, seq_len)
    inputs[:, 0 : 2 * n_slots : 2] = FIRST_KEY + keys
    inputs[:, 1 : 2 * n_slots : 2] = FIRST_KEY + n_keys + vals
    inputs[:, -2] = FIRST_KEY + needle_key[:, 0]
    inputs[:, -1] = SEP
    targets[:, -1] = needle_val[:, 0]
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# Associative recall at length
# --------------------------------------------------------------------------------------------------------------


def make_long_recall(n_samples: int, seq_len: int, *, n_pairs: int | None = None, n_keys: int | None = None,
                     n_values: int = 10, seed: int = 0) -> Batch:
    """Associative recall at 256–4096: ``k_1 v_1 … k_n v_n [_ …] q SEP``; the last position predicts q's value.

    The ``n_pairs`` keys of a sample are distinct (drawn from ``n_keys``, default 2048, so that every length up to
    4096 fits), values uniform in ``0 … n_values - 1`` (token ids as in :func:`make_needle`); the query is one of
    the keys, uniformly, so the answer can be anywhere. ``n_pairs`` defaults to as many as fit,
    ``(seq_len - 2) // 2``. Label: the value's class index. Chance: ``1 / n_values``.
    Vocabulary ``2 + n_keys + n_values``.
    """
    where = "make_long_recall"
    check_positive_int(n_samples, "n_samples", where)
    _where_seq_len(where, seq_len, 4, "one key-value pair, the query key and SEP")
    _check_at_least(n_values, "n_values", where, 2)
    n_keys = _RECALL_DEFAULTS["n_keys"] if n_keys is None else _check_at_least(n_keys, "n_keys", where, 1)
    check_seed(seed, where)
    fit = (seq_len - 2) // 2
    if n_pairs is None:
        n_pairs = min(fit, n_keys)
    else:
        check_positive_int(n_pairs, "n_pairs", where)
        if n_pairs > fit:
            raise ValueError(f"{where}: n_pairs must be <= (seq_len - 2) // 2 = {fit} for seq_len={seq_len}, "
                             f"got {n_pairs}")
    if n_pairs > n_keys:
        raise ValueError(f"{where}: n_pairs must be <= n_keys={n_keys} (the keys of a sample are distinct), "
                         f"got {n_pairs}; pass n_keys >= {n_pairs}")
    g = torch.Generator().manual_seed(seed)
    N, n = n_samples, n_pairs
    keys = torch.rand(N, n_keys, generator=g).argsort(dim=1)[:, :n]  # distinct keys per row
    vals = torch.randint(0, n_values, (N, n), generator=g)
    q = torch.randint(0, n, (N, 1), generator=g)
    inputs, targets = _classify(N, seq_len)
    inputs[:, 0 : 2 * n : 2] = FIRST_KEY + keys
    inputs[:, 1 : 2 * n : 2] = FIRST_KEY + n_keys + vals
    inputs[:, -2] = FIRST_KEY + keys.gather(1, q)[:, 0]
    inputs[:, -1] = SEP
    targets[:, -1] = vals.gather(1, q)[:, 0]
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# ListOps at length (LRA settings): a numba loop over tokens, with its own seeded xorshift64* stream per sample
# --------------------------------------------------------------------------------------------------------------


def _listops_rows_py(seeds, seq_len, min_len, max_depth, max_args, leaf_p, ops, out, labels, lengths):
    """Fill ``out[n, :]`` with one expression per row (numba-compiled by :func:`_listops_kernel`).

    Per row: draw a budget in ``[min_len, seq_len - 1]`` and grow a random tree top-down with an explicit stack
    (an operator whenever 4 tokens fit and the depth allows; ``2 … max_args`` arguments, each a digit with
    probability ``leaf_p``; the budget left is split exactly among the operator arguments); evaluate it on the
    way up (MAX, MIN, MED rounded down, SUM_MOD); redraw when the expression came out shorter than ``min_len``.
    Returns the number of rows that needed more than 1000 draws (0 unless the settings cannot reach min_len).
    """
    N = seeds.shape[0]
    f_op = np.zeros(max_depth + 1, np.int64)
    f_n = np.zeros(max_depth + 1, np.int64)
    f_next = np.zeros(max_depth + 1, np.int64)
    f_nv = np.zeros(max_depth + 1, np.int64)
    cb = np.zeros((max_depth + 1, max_args), np.int64)
    cnt = np.zeros((max_depth + 1, 10), np.int64)
    w = np.zeros(max_args, np.float64)
    failed = 0
    for n in range(N):
        state = seeds[n]
        for attempt in range(1000):
            state ^= state >> np.uint64(12)
            state ^= state << np.uint64(25)
            state ^= state >> np.uint64(27)
            u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
            budget = min_len + int(u * (seq_len - min_len))  # uniform in [min_len, seq_len - 1]
            pos = 0
            sp = 0
            nb = budget
            nd = 0
            mode = 0  # 0: grow a node (nb tokens at most, depth nd); 1: hand `val` to the parent; 2: step the top
            val = 0
            result = -1
            while True:
                if mode == 0:
                    if nb < 4 or nd >= max_depth:
                        state ^= state >> np.uint64(12)
                        state ^= state << np.uint64(25)
                        state ^= state >> np.uint64(27)
                        u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                        val = int(u * 10)
                        out[n, pos] = LISTOPS_DIGIT0 + val
                        pos += 1
                        mode = 1
                    else:
                        state ^= state >> np.uint64(12)
                        state ^= state << np.uint64(25)
                        state ^= state >> np.uint64(27)
                        u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                        op = ops[int(u * 4)]
                        out[n, pos] = op
                        pos += 1
                        inner = nb - 2
                        hi = min(max_args, inner)
                        last = nd + 1 >= max_depth  # children must be digits: use as many as the budget allows
                        if last:
                            k = hi
                        else:
                            state ^= state >> np.uint64(12)
                            state ^= state << np.uint64(25)
                            state ^= state >> np.uint64(27)
                            u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                            k = 2 + int(u * (hi - 1))
                        n_ops = 0
                        for i in range(k):
                            leaf = last
                            if not last:
                                state ^= state >> np.uint64(12)
                                state ^= state << np.uint64(25)
                                state ^= state >> np.uint64(27)
                                u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                                leaf = u < leaf_p
                            cb[nd, i] = -1 if leaf else 0
                            if not leaf:
                                n_ops += 1
                        if n_ops == 0 and not last and inner - k >= 3:  # keep one operator to use the budget
                            state ^= state >> np.uint64(12)
                            state ^= state << np.uint64(25)
                            state ^= state >> np.uint64(27)
                            u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                            cb[nd, int(u * k)] = 0
                            n_ops = 1
                        extra = inner - k  # tokens beyond one per argument, split exactly among the operators
                        total = 0.0
                        for j in range(n_ops):
                            state ^= state >> np.uint64(12)
                            state ^= state << np.uint64(25)
                            state ^= state >> np.uint64(27)
                            u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                            w[j] = u + 0.05
                            total += w[j]
                        acc = 0.0
                        prev = 0
                        j = 0
                        for i in range(k):
                            if cb[nd, i] >= 0:
                                acc += w[j]
                                cut = extra if j == n_ops - 1 else int(extra * acc / total)
                                cb[nd, i] = 1 + cut - prev
                                prev = cut
                                j += 1
                        f_op[nd] = op
                        f_n[nd] = k
                        f_next[nd] = 0
                        f_nv[nd] = 0
                        for d in range(10):
                            cnt[nd, d] = 0
                        sp = nd + 1
                        mode = 2
                elif mode == 1:
                    if sp == 0:
                        result = val
                        break
                    t = sp - 1
                    cnt[t, val] += 1
                    f_nv[t] += 1
                    mode = 2
                else:
                    t = sp - 1
                    if f_next[t] < f_n[t]:
                        c = cb[t, f_next[t]]
                        f_next[t] += 1
                        if c < 0:
                            state ^= state >> np.uint64(12)
                            state ^= state << np.uint64(25)
                            state ^= state >> np.uint64(27)
                            u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                            val = int(u * 10)
                            out[n, pos] = LISTOPS_DIGIT0 + val
                            pos += 1
                            mode = 1
                        else:
                            nb = c
                            nd = sp
                            mode = 0
                    else:
                        out[n, pos] = LISTOPS_CLOSE
                        pos += 1
                        m = f_nv[t]  # the arguments' values are counted in cnt[t, 0..9]
                        op = f_op[t]
                        if op == LISTOPS_MAX:
                            val = 9
                            while cnt[t, val] == 0:
                                val -= 1
                        elif op == LISTOPS_MIN:
                            val = 0
                            while cnt[t, val] == 0:
                                val += 1
                        elif op == LISTOPS_MED:  # the (m-1)//2-th and m//2-th smallest, mean rounded down
                            lo = -1
                            hi = -1
                            seen = 0
                            for d in range(10):
                                seen += cnt[t, d]
                                if lo < 0 and seen > (m - 1) // 2:
                                    lo = d
                                if hi < 0 and seen > m // 2:
                                    hi = d
                            val = (lo + hi) // 2
                        else:
                            val = 0
                            for d in range(10):
                                val += d * cnt[t, d]
                            val = val % 10
                        sp -= 1
                        mode = 1
            if pos >= min_len:
                break
            for i in range(pos):
                out[n, i] = PAD
            if attempt == 999:
                failed += 1
        labels[n] = result
        lengths[n] = pos
    return failed


_KERNEL = []


def _listops_kernel():
    """:func:`_listops_rows_py` compiled by numba (imported here, on first use, so ``import effedu.data`` stays
    light); cached on disk by numba after the first compilation."""
    if not _KERNEL:
        from numba import njit

        _KERNEL.append(njit(cache=True, nogil=True)(_listops_rows_py))
    return _KERNEL[0]


def _listops_capacity(max_depth, max_args):
    cap = 1
    for _ in range(max_depth):
        cap = 2 + max_args * cap
        if cap > 1 << 40:
            break
    return cap


def make_long_listops(n_samples: int, seq_len: int, *, seed: int = 0, max_depth: int = 10, max_args: int = 10,
                      leaf_p: float = 0.25) -> Batch:
    """LRA ListOps at length: ``expression [_ …] SEP``, length in ``[⌈seq_len/2⌉, seq_len - 1]``; label 0–9.

    Same tokens (``LISTOPS_*``, vocabulary 17) and the same exact semantics as :func:`effedu.data.make_listops`
    (``evaluate_listops`` of the expression is the label); LRA's settings: at most ``max_depth = 10`` nested
    brackets, 2 … ``max_args = 10`` arguments per operator, an argument a digit with probability ``leaf_p``
    (LRA's ``VALUE_P = 0.25``). The short generator is token-by-token Python (about 7 µs per token) and fills
    only about 70 % of its budget; this one grows the same kind of tree in a numba loop (about 0.1 s for
    512 × 4096 tokens, after a one-off compilation — a few seconds, cached on disk by numba), splits the budget exactly, and redraws an
    expression shorter than ``seq_len / 2``. Classes are unbalanced (MAX/MIN of many arguments is often 9/0):
    the majority class (9, then 0) is 17–20 % of the labels at the defaults, ``long_range_info("listops")["chance"]``
    = 0.18; every other value 6–9 %.
    """
    where = "make_long_listops"
    check_positive_int(n_samples, "n_samples", where)
    _where_seq_len(where, seq_len, 5, "the shortest expression [OP d d ] and the final SEP")
    check_seed(seed, where)
    check_positive_int(max_depth, "max_depth", where)
    _check_at_least(max_args, "max_args", where, 2)
    if isinstance(leaf_p, bool) or not isinstance(leaf_p, (int, float)) or not 0.0 <= leaf_p < 1.0:
        raise ValueError(f"{where}: leaf_p must be a probability in [0, 1), got {leaf_p!r}")
    min_len = (seq_len + 1) // 2
    if _listops_capacity(max_depth, max_args) < min_len:
        raise ValueError(f"{where}: max_depth={max_depth} and max_args={max_args} cannot make an expression of "
                         f"seq_len / 2 = {min_len} tokens (at most {_listops_capacity(max_depth, max_args)}); "
                         f"raise max_depth or max_args")
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(1, 2**62, (n_samples,), generator=g).numpy().astype(np.uint64)
    out = np.zeros((n_samples, seq_len), np.int64)
    labels = np.zeros(n_samples, np.int64)
    lengths = np.zeros(n_samples, np.int64)
    ops = np.array(LISTOPS_OPS, np.int64)
    failed = _listops_kernel()(seeds, seq_len, min_len, max_depth, max_args, float(leaf_p), ops, out, labels,
                               lengths)
    if failed:
        raise ValueError(f"{where}: max_depth={max_depth}, max_args={max_args}, leaf_p={leaf_p} rarely reach "
                         f"seq_len / 2 = {min_len} tokens ({failed} rows failed 1000 draws); raise max_depth, "
                         f"max_args or lower leaf_p")
    inputs = torch.from_numpy(out)
    inputs[:, -1] = SEP
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    targets[:, -1] = torch.from_numpy(labels)
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# Byte-level text classification on the corpus grammar
# --------------------------------------------------------------------------------------------------------------


def text_passages(n_samples: int, seq_len: int, *, label: str = "kind", purity: float = 0.6, seed: int = 0):
    """The passages behind :func:`make_text_classification`: ``(passages, labels, kinds, names)``.

    ``passages[n]`` is a list of sentences (joined by one space they are the row's text), ``kinds[n]`` the class
    of each sentence as written by :func:`effedu.data.corpus.generate_labelled_sentences`, ``labels[n]`` the
    passage's majority class, ``names`` the class names. Sentences come from a pool of labelled sentences drawn
    with ``seed``; a passage takes its label uniformly, then sentences until ``seq_len - 1`` bytes are full: one of
    the label's class whenever fewer than ``purity`` of the sentences so far are, else one of another class;
    a trailing other-class sentence is dropped until the label has a strict majority; the order is shuffled.
    """
    where = "make_text_classification"
    check_positive_int(n_samples, "n_samples", where)
    _where_seq_len(where, seq_len, 128, "at least one whole sentence of the corpus grammar and SEP")
    check_seed(seed, where)
    check_choice(label, TEXT_LABELS, "label", where)
    if isinstance(purity, bool) or not isinstance(purity, (int, float)) or not 0.5 < purity <= 1.0:
        raise ValueError(f"{where}: purity must be a fraction in (0.5, 1], got {purity!r}")
    names = TEXT_LABELS[label]
    C = len(names)
    # a pool of labelled sentences, about one per 50 bytes needed, capped: sampled with replacement
    pool_n = max(64 * C, min(8192, n_samples * seq_len // 50))
    texts, labs, _ = generate_labelled_sentences(pool_n, seed, label=label)
    by_class = [[] for _ in range(C)]
    for t, c in zip(texts, labs):
        by_class[c].append(t.encode("utf-8"))
    rng = random.Random(seed * 1_000_003 + 17)
    budget = seq_len - 1
    passages, labels, kinds = [], [], []
    for _ in range(n_samples):
        y = rng.randrange(C)
        sents, ks, used, n_y = [], [], 0, 0
        while True:
            c = y if n_y < purity * (len(ks) + 1) else (y + 1 + rng.randrange(C - 1)) % C
            s = rng.choice(by_class[c])
            extra = len(s) + (1 if sents else 0)
            if used + extra > budget:
                if sents:
                    break
                continue  # a first sentence longer than the whole passage: draw another
            sents.append(s)
            ks.append(c)
            used += extra
            n_y += c == y
        while 2 * n_y <= len(ks):  # strict majority: drop an other-class sentence
            i = max(i for i, c in enumerate(ks) if c != y)
            del sents[i], ks[i]
        order = list(range(len(ks)))
        rng.shuffle(order)
        passages.append([sents[i].decode("utf-8") for i in order])
        kinds.append([ks[i] for i in order])
        labels.append(y)
    return passages, labels, kinds, list(names)


def make_text_classification(n_samples: int, seq_len: int, *, label: str = "kind", purity: float = 0.6,
                             seed: int = 0) -> Batch:
    """Byte-level text classification: ``UTF-8 bytes of a passage [_ …] SEP``; the last position predicts its class.

    Byte ``b`` has id ``b + N_SPECIAL`` (vocabulary 258). A passage (:func:`text_passages`) is whole sentences of
    the corpus grammar filling at most ``seq_len - 1`` bytes; ``label="kind"``: the majority sentence kind of the
    passage (8 classes, ``purity`` = 0.6 of the sentences by default, the rest from the other 7 kinds, shuffled);
    ``label="tense"``: the majority tense (present 0 / past 1). Labels uniform: chance ``1 / 8`` or ``1 / 2``.
    """
    passages, labels, _, _ = text_passages(n_samples, seq_len, label=label, purity=purity, seed=seed)
    blob = [" ".join(p).encode("utf-8") for p in passages]
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    for n, b in enumerate(blob):
        inputs[n, : len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8).long() + BYTE0
    inputs[:, -1] = SEP
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    targets[:, -1] = torch.tensor(labels, dtype=torch.long)
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# Registry: info, dispatch, rendering
# --------------------------------------------------------------------------------------------------------------

_MAKERS = {"needle": make_needle, "recall": make_long_recall, "listops": make_long_listops,
           "text": make_text_classification}


def long_range_info(name: str, **kw) -> dict:
    """``{"vocab_size", "num_classes", "chance", "description"}`` of long-range task ``name`` at its defaults
    (or with the keyword arguments ``kw`` given to its generator: ``n_keys``/``n_values``, ``label``).

    ``chance`` is the accuracy of the best constant guess: ``1 / n_values`` (needle, recall; uniform values),
    ``1 / num_classes`` (text; uniform labels), the majority-class rate for ListOps (its classes are unbalanced;
    measured with the defaults on 4096 samples: 0.171 at length 256, 0.185 at 1024, 0.20 at 4096 → 0.18).
    """
    check_choice(name, LONG_RANGE_TASKS, "long-range task name", "long_range_info")
    if name in ("needle", "recall"):
        d = dict(_NEEDLE_DEFAULTS if name == "needle" else _RECALL_DEFAULTS)
        d.update({k: v for k, v in kw.items() if k in ("n_keys", "n_values") and v is not None})
        desc = ("a key-value needle in the first 10% of a haystack of other keys' pairs; its value asked for at "
                "the end" if name == "needle" else
                "associative recall: n distinct key-value pairs, one key asked for at the end")
        return {"vocab_size": N_SPECIAL + d["n_keys"] + d["n_values"], "num_classes": d["n_values"],
                "chance": 1.0 / d["n_values"], "description": desc}
    if name == "listops":
        return {"vocab_size": LISTOPS_VOCAB, "num_classes": 10, "chance": LISTOPS_CHANCE,
                "description": "LRA ListOps (MIN/MAX/MED/SUM_MOD, depth <= 10, <= 10 args): the expression's value"}
    label = kw.get("label", "kind")
    check_choice(label, TEXT_LABELS, "label", "long_range_info")
    C = len(TEXT_LABELS[label])
    return {"vocab_size": TEXT_VOCAB, "num_classes": C, "chance": 1.0 / C,
            "description": f"byte-level text: the majority sentence {label} of a passage of corpus sentences"}


def make_long_range(name: str, n_samples: int, seq_len: int, *, seed: int = 0, **kw) -> Batch:
    """``make_<name>(n_samples, seq_len, seed=seed, **kw)`` for ``name`` in :data:`LONG_RANGE_TASKS`."""
    return _MAKERS[check_choice(name, LONG_RANGE_TASKS, "long-range task name", "make_long_range")](
        n_samples, seq_len, seed=seed, **kw)


def long_range_to_text(name: str, tokens, *, n_keys: int | None = None) -> str:
    """A row of a long-range task, readable: ``k3``/``v1`` (needle, recall), ListOps glyphs, bytes as characters
    (text); PAD ``_``, SEP ``|``. ``n_keys``: the generator's, when not its default."""
    check_choice(name, LONG_RANGE_TASKS, "long-range task name", "long_range_to_text")
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    tokens = [int(t) for t in tokens]
    if name == "listops":
        return to_text("listops", tokens)
    if name == "text":
        return "".join("_" if t == PAD else "|" if t == SEP else chr(t - BYTE0) for t in tokens)
    if n_keys is None:
        n_keys = (_NEEDLE_DEFAULTS if name == "needle" else _RECALL_DEFAULTS)["n_keys"]
    words = []
    for t in tokens:
        if t == PAD:
            words.append("_")
        elif t == SEP:
            words.append("|")
        elif t - FIRST_KEY < n_keys:
            words.append(f"k{t - FIRST_KEY}")
        else:
            words.append(f"v{t - FIRST_KEY - n_keys}")
    return " ".join(words)


__all__ = ["LONG_RANGE_TASKS", "make_needle", "make_long_recall", "make_long_listops", "make_text_classification",
           "text_passages", "long_range_info", "make_long_range", "long_range_to_text", "TEXT_VOCAB", "TEXT_LABELS",
           "FIRST_KEY", "BYTE0"]
