"""Data for the course: six synthetic tasks that probe attention, and a tiny text corpus.

Every chapter trains or measures the same small Transformer on data that is made here, in code, in seconds, with
nothing downloaded. Each synthetic task isolates one thing attention has to do, so that when a faster or lighter
variant (sparse, low-rank, kernelised, pruned, quantised ...) loses accuracy, we can say *which* ability it lost.

All tasks return a :class:`Batch` ``(inputs, targets)`` of two ``LongTensor`` of shape ``(N, L)``:

* ``inputs[n, t]`` is the token the model reads at position ``t``;
* ``targets[n, t]`` is what the model must predict *at* position ``t`` (next-token convention: a causal LM at
  position t has seen ``inputs[n, :t+1]`` and predicts ``targets[n, t]``); every position that is not scored
  holds ``IGNORE = -100``, so ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)``
  is the task loss, and ``(targets != IGNORE)`` is the mask for accuracy.

The tasks (``TASKS`` maps these names to the generators):

``copy``, ``reverse``, ``sort`` — sequence-to-sequence, written as one sequence for a decoder:
    ``x_1 … x_k  SEP  y_1 … y_k  [PAD …]``  with ``y = x`` (copy), ``y = reversed(x)`` (reverse) or
    ``y = sorted(x)`` (sort). Only the answer is scored: the position holding SEP predicts ``y_1``, the position
    holding ``y_i`` predicts ``y_{i+1}``. *Copy* and *reverse* need long-range, exact retrieval: to emit
    ``y_i`` the model must attend from position ``k+i`` back to position ``i`` (copy, a constant offset k+1) or
    to ``k+1-i`` (reverse, an offset that changes at every step) — a local window or a low-rank summary of the
    prompt cannot do it once k is larger than the window / rank. *Sort* needs global comparison: ``y_i`` depends
    on every prompt token at once (how many are smaller), there is no single position to copy from.

``recall`` (associative recall) — ``k_1 v_1 k_2 v_2 … k_n v_n  SEP  q  v`` with distinct keys; the query
    ``q`` is one of the keys and the position holding ``q`` must predict the value paired with it. This is the
    task that *induction heads* solve (Olsson et al. 2022; Zoology/MQAR, Arora et al. 2023): find the earlier
    occurrence of the current token, look one step to the right, copy. Attention does it in two layers;
    recurrent and many linear-attention models with a small state cannot, because they must store all n pairs.

``listops`` — ListOps (Nangia & Bowman 2018), the first task of the Long Range Arena (Tay et al. 2021):
    nested prefix expressions such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` over digits 0-9 with the operators MAX, MIN,
    MED (median, rounded down as in LRA) and SM (sum modulo 10). The answer is the value 0-9 of the whole
    expression, a 10-way classification scored at the last position. It tests *hierarchical* processing: the
    value of a bracket depends on values computed deep inside it, possibly hundreds of tokens away.

``brackets`` — bracket matching (a Dyck language, e.g. ``( [ ] ( ) )``): is the string balanced? Label 1 or
    0 at the last position, about half of each; the unbalanced ones are *near misses* (one bracket flipped,
    swapped or of the wrong type), so length and token counts alone do not give the answer. With one bracket
    type it is a *counting* task (depth never negative, zero at the end); with several types the model must
    also remember which bracket is open, i.e. emulate a *stack*. Attention can count (uniform attention
    averages ±1) but finite-precision, fixed-depth models struggle as the nesting deepens.

For the two classification tasks the target at the last position is the *class index* (0-9 for ListOps, 0/1 for
brackets), not a token id; it is below every task's vocabulary size, so either a classification head with
``NUM_CLASSES[name]`` outputs or the LM head works.

Token ids. The first ids of every vocabulary are reserved: ``PAD = 0`` (padding, never scored) and
``SEP = 1`` (separates prompt and answer; at the last position of ListOps/brackets it is the "answer now"
marker, like a CLS token placed at the end so a causal model has read everything). Task tokens follow from
``FIRST_SYMBOL = 2`` on; the ListOps and bracket layouts are the ``LISTOPS_*`` / ``BRACKET_*`` constants below.
A generator asked for a ``vocab_size`` too small for its layout, or a ``seq_len`` too short to hold one example,
raises a ``ValueError`` that says what the minimum is.

The corpus. For the language-model chapters (training curves, distillation, quantisation, pruning ...) the course
ships ``data/tiny_corpus.txt``, about 200 KB of English-like text that :func:`generate_corpus` writes from a seeded
probabilistic grammar (a few hundred words): subjects, verbs and objects with number agreement across relative
clauses and prepositional phrases ("the keys near the old doors *are* ..."), a tense kept for a whole paragraph,
a protagonist named once and then referred to as "he"/"she", numbers that agree with their noun, quotes and
parentheses that are opened and closed. Short-range rules (spelling, "a"/"an") are learnt by any model;
the long-range ones are where attention earns its cost. ``python -m effedu.data --regenerate`` rewrites the file
(see ``data/README.md``); a test checks the shipped file is byte-for-byte ``generate_corpus()``.

Determinism: every random choice takes ``seed=`` and draws from a local ``torch.Generator`` (the corpus, pure
Python, from a local ``random.Random(seed)``), never from a global RNG: the same call gives the same tensors on
every run and every machine, whatever else the notebook did before.
"""
from __future__ import annotations

import argparse
import random
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from ._checks import check_positive_int

# --------------------------------------------------------------------------------------------------------------
# Token layout and the batch type
# --------------------------------------------------------------------------------------------------------------

IGNORE = -100  # target of every unscored position (F.cross_entropy's default ignore_index)
PAD = 0  # padding token, never scored
SEP = 1  # prompt/answer separator; "answer now" marker at the last position of listops/brackets
FIRST_SYMBOL = 2  # first id available to task tokens (ids 0 .. FIRST_SYMBOL-1 are reserved)
N_SPECIAL = FIRST_SYMBOL

# ListOps: digits 0-9 are ids 2..11, then the four operators (each one also opens a bracket) and the closing "]".
LISTOPS_DIGIT0 = FIRST_SYMBOL  # digit d has id LISTOPS_DIGIT0 + d
LISTOPS_MAX = LISTOPS_DIGIT0 + 10  # "[MAX"
LISTOPS_MIN = LISTOPS_MAX + 1  # "[MIN"
LISTOPS_MED = LISTOPS_MAX + 2  # "[MED"  median, rounded down: int(statistics.median(xs)) as in LRA
LISTOPS_SM = LISTOPS_MAX + 3  # "[SM"   sum modulo 10
LISTOPS_CLOSE = LISTOPS_MAX + 4  # "]"
LISTOPS_OPS = (LISTOPS_MAX, LISTOPS_MIN, LISTOPS_MED, LISTOPS_SM)
LISTOPS_VOCAB = LISTOPS_CLOSE + 1  # = 17
LISTOPS_NAMES = {LISTOPS_MAX: "[MAX", LISTOPS_MIN: "[MIN", LISTOPS_MED: "[MED", LISTOPS_SM: "[SM", LISTOPS_CLOSE: "]"}

# Brackets: bracket type i opens with id BRACKET_OPEN0 + 2i and closes with id BRACKET_OPEN0 + 2i + 1.
BRACKET_OPEN0 = FIRST_SYMBOL
BRACKET_CHARS = "()[]{}<>"  # how types 0..3 are printed

NUM_CLASSES = {"listops": 10, "brackets": 2}  # classification tasks: number of classes of the last-position label


class Batch(NamedTuple):
    """``inputs`` and ``targets``, both ``LongTensor (N, L)``; ``targets == IGNORE`` where nothing is scored."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> "Batch":
        """The same batch on ``device`` (e.g. ``batch.to("cuda")``)."""
        return Batch(self.inputs.to(device), self.targets.to(device))

    @property
    def mask(self) -> torch.Tensor:
        """``BoolTensor (N, L)``: True where a target is scored."""
        return self.targets != IGNORE


# --------------------------------------------------------------------------------------------------------------
# Argument checks and a fast stream of random numbers drawn from a local torch.Generator
# --------------------------------------------------------------------------------------------------------------


def _check_seed(seed, where):
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative int, got {seed}")
    return seed


def _generator(seed, where):
    return torch.Generator().manual_seed(_check_seed(seed, where))


def _check_task_args(where, n_samples, seq_len, vocab_size, seed, *, min_len, min_vocab, why_len, why_vocab):
    check_positive_int(n_samples, "n_samples", where)
    check_positive_int(seq_len, "seq_len", where)
    check_positive_int(vocab_size, "vocab_size", where)
    _check_seed(seed, where)
    if seq_len < min_len:
        raise ValueError(f"{where}: seq_len must be >= {min_len} ({why_len}), got {seq_len}")
    if vocab_size < min_vocab:
        raise ValueError(f"{where}: vocab_size must be >= {min_vocab} ({why_vocab}), got {vocab_size}")


class _Stream:
    """Python-speed random choices for the tree-shaped tasks, fed by a local ``torch.Generator``.

    ListOps and brackets are built token by token with branching logic; one ``torch.randint`` call per choice
    would cost microseconds each, so uniforms are drawn from the generator in chunks and handed out one by one.
    """

    def __init__(self, seed, chunk=8192):
        self.g = torch.Generator().manual_seed(seed)
        self.chunk = chunk
        self.buf: list[float] = []
        self.i = 0

    def random(self) -> float:  # U[0, 1)
        if self.i == len(self.buf):
            self.buf = torch.rand(self.chunk, generator=self.g, dtype=torch.float64).tolist()
            self.i = 0
        self.i += 1
        return self.buf[self.i - 1]

    def randint(self, a, b) -> int:  # uniform on {a, ..., b}, both ends included
        return a + min(int(self.random() * (b - a + 1)), b - a)

    def choice(self, seq):
        return seq[self.randint(0, len(seq) - 1)]


# --------------------------------------------------------------------------------------------------------------
# Copy, reverse, sort:   x_1 … x_k SEP y_1 … y_k [PAD …]
# --------------------------------------------------------------------------------------------------------------


def _seq2seq(where, n_samples, seq_len, vocab_size, seed, answer_of):
    _check_task_args(
        where, n_samples, seq_len, vocab_size, seed, min_len=3, min_vocab=N_SPECIAL + 2,
        why_len="a prompt of 1 token, SEP and an answer of 1 token",
        why_vocab=f"{N_SPECIAL} reserved ids (PAD, SEP) and at least 2 symbols",
    )
    g = _generator(seed, where)
    # k prompt tokens + SEP + k answer tokens = 2k+1 ≤ L; one PAD at the end when L is even
    k = (seq_len - 1) // 2
    x = torch.randint(FIRST_SYMBOL, vocab_size, (n_samples, k), generator=g)  # (N, k) prompt symbols
    y = answer_of(x)  # (N, k)
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    inputs[:, :k] = x
    inputs[:, k] = SEP
    inputs[:, k + 1 : 2 * k + 1] = y
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    # position t predicts token t+1: positions k (SEP) … 2k-1 predict y_1 … y_k
    targets[:, k : 2 * k] = y
    return Batch(inputs, targets)


def make_copy(n_samples: int, seq_len: int, *, vocab_size: int = 12, seed: int = 0) -> Batch:
    """Copy: ``x SEP x``. ``k = (seq_len - 1) // 2`` prompt symbols drawn uniformly from ``vocab_size - 2``."""
    return _seq2seq("make_copy", n_samples, seq_len, vocab_size, seed, lambda x: x.clone())


def make_reverse(n_samples: int, seq_len: int, *, vocab_size: int = 12, seed: int = 0) -> Batch:
    """Reverse: ``x SEP reversed(x)``; same layout as :func:`make_copy`."""
    return _seq2seq("make_reverse", n_samples, seq_len, vocab_size, seed, lambda x: x.flip(1))


def make_sort(n_samples: int, seq_len: int, *, vocab_size: int = 12, seed: int = 0) -> Batch:
    """Sort: ``x SEP sorted(x)`` (ascending token ids, repeats kept); same layout as :func:`make_copy`."""
    return _seq2seq("make_sort", n_samples, seq_len, vocab_size, seed, lambda x: x.sort(dim=1).values)


# --------------------------------------------------------------------------------------------------------------
# Associative recall:   k_1 v_1 … k_n v_n SEP q v [PAD …]
# --------------------------------------------------------------------------------------------------------------


def recall_layout(vocab_size: int) -> tuple[range, range]:
    """The key ids and value ids of :func:`make_associative_recall` for ``vocab_size`` (two disjoint halves)."""
    n_keys = (vocab_size - N_SPECIAL) // 2
    return range(FIRST_SYMBOL, FIRST_SYMBOL + n_keys), range(FIRST_SYMBOL + n_keys, vocab_size)


def make_associative_recall(
    n_samples: int, seq_len: int, *, vocab_size: int = 130, n_pairs: int | None = None, seed: int = 0
) -> Batch:
    """Associative recall: n key-value pairs, ``SEP``, a query key; its position predicts the paired value.

    Keys come from the first half of the symbols and are distinct within a sample (so the answer is unique);
    values from the second half, with repeats. ``n_pairs`` defaults to as many as fit, ``(seq_len - 3) // 2``;
    with fewer, the tail is PAD. The answer value is also written after the query, so the layout matches the
    seq2seq tasks: ``inputs[n, t + 1] == targets[n, t]`` at the scored position.
    """
    where = "make_associative_recall"
    _check_task_args(
        where, n_samples, seq_len, vocab_size, seed, min_len=5, min_vocab=N_SPECIAL + 2,
        why_len="one key-value pair, SEP, the query and its value",
        why_vocab=f"{N_SPECIAL} reserved ids, at least 1 key id and 1 value id",
    )
    keys_r, vals_r = recall_layout(vocab_size)
    fit = (seq_len - 3) // 2
    if n_pairs is None:
        n_pairs = fit
        if n_pairs > len(keys_r):
            raise ValueError(
                f"{where}: vocab_size={vocab_size} gives only {len(keys_r)} distinct keys but seq_len={seq_len} "
                f"holds {n_pairs} pairs; pass vocab_size >= {N_SPECIAL + 2 * n_pairs} or n_pairs <= {len(keys_r)}"
            )
    else:
        check_positive_int(n_pairs, "n_pairs", where)
        if n_pairs > fit:
            raise ValueError(f"{where}: n_pairs must be <= (seq_len - 3) // 2 = {fit} for seq_len={seq_len}, "
                             f"got {n_pairs}")
        if n_pairs > len(keys_r):
            raise ValueError(f"{where}: n_pairs must be <= the {len(keys_r)} distinct keys that vocab_size="
                             f"{vocab_size} gives, got {n_pairs}")
    g = _generator(seed, where)
    n = n_pairs
    # distinct keys per row: the first n entries of a random permutation of the key ids
    keys = torch.rand(n_samples, len(keys_r), generator=g).argsort(dim=1)[:, :n] + keys_r.start  # (N, n)
    vals = torch.randint(vals_r.start, vals_r.stop, (n_samples, n), generator=g)  # (N, n)
    q = torch.randint(0, n, (n_samples, 1), generator=g)  # (N, 1) which pair is asked for
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = vals
    inputs[:, 2 * n] = SEP
    inputs[:, 2 * n + 1] = keys.gather(1, q)[:, 0]  # the query key
    answer = vals.gather(1, q)[:, 0]  # v such that (q, v) was a pair
    inputs[:, 2 * n + 2] = answer
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    targets[:, 2 * n + 1] = answer
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# ListOps (Long Range Arena)
# --------------------------------------------------------------------------------------------------------------


def _apply_op(op: int, args: list[int]) -> int:
    if op == LISTOPS_MAX:
        return max(args)
    if op == LISTOPS_MIN:
        return min(args)
    if op == LISTOPS_MED:
        s = sorted(args)
        m = len(s) // 2
        # median; for an even count the mean of the two middle values, rounded down (LRA: int(np.median))
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2
    if op == LISTOPS_SM:
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator id {op}")


def evaluate_listops(tokens) -> int:
    """Value (0-9) of a ListOps expression given as token ids (list or 1-D tensor); PAD and SEP are skipped.

    The reference evaluator: a stack of open brackets, each collecting the values of its arguments; ``]`` applies
    the operator and hands the result to the enclosing bracket. Raises ``ValueError`` on a malformed expression.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"evaluate_listops: tokens must be 1-D, got shape {tuple(tokens.shape)}")
        tokens = tokens.tolist()
    stack: list[tuple[int, list[int]]] = []  # (operator, values of the arguments seen so far)
    result = None
    for pos, tok in enumerate(tokens):
        tok = int(tok)
        if tok in (PAD, SEP):
            continue
        if result is not None:
            raise ValueError(f"evaluate_listops: token {tok} at position {pos} after the expression ended")
        if LISTOPS_DIGIT0 <= tok < LISTOPS_DIGIT0 + 10:
            if not stack:
                result = tok - LISTOPS_DIGIT0  # a bare digit is an expression too
            else:
                stack[-1][1].append(tok - LISTOPS_DIGIT0)
        elif tok in LISTOPS_OPS:
            stack.append((tok, []))
        elif tok == LISTOPS_CLOSE:
            if not stack or not stack[-1][1]:
                raise ValueError(f"evaluate_listops: unexpected ']' at position {pos}")
            op, args = stack.pop()
            value = _apply_op(op, args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        else:
            raise ValueError(f"evaluate_listops: token id {tok} at position {pos} is not a ListOps token "
                             f"(expected digits {LISTOPS_DIGIT0}..{LISTOPS_DIGIT0 + 9}, operators, ']', PAD, SEP)")
    if stack or result is None:
        raise ValueError("evaluate_listops: incomplete expression (unclosed bracket or no tokens)")
    return result


def _listops_tree(rng: _Stream, budget: int, depth: int, max_depth: int, max_args: int, leaf_p: float) -> list[int]:
    """Tokens of a random expression of at most ``budget`` tokens (an operator whenever 4 tokens fit).

    Each argument is first made a digit (probability ``leaf_p``, or always at ``max_depth``); the budget left is
    shared at random among the operator arguments, so the expression fills most of its budget.
    """
    # an operator needs [OP, ≥2 arguments, ] = at least 4 tokens
    if budget < 4 or depth >= max_depth:
        return [LISTOPS_DIGIT0 + rng.randint(0, 9)]
    op = rng.choice(LISTOPS_OPS)
    inner = budget - 2  # room for the arguments
    n_args = rng.randint(2, min(max_args, inner))
    is_leaf = [depth + 1 >= max_depth or rng.random() < leaf_p for _ in range(n_args)]
    if all(is_leaf) and depth + 1 < max_depth and inner - n_args >= 3:  # keep one operator to use the budget
        is_leaf[rng.randint(0, n_args - 1)] = False
    # split what the digits leave into random parts, one per operator argument, each ≥ 1 token
    n_ops = n_args - sum(is_leaf)
    extra = inner - n_args
    w = [rng.random() + 0.05 for _ in range(n_ops)]
    sizes = iter([1 + int(extra * wi / sum(w)) for wi in w])
    out = [op]
    for leaf in is_leaf:
        if leaf:
            out.append(LISTOPS_DIGIT0 + rng.randint(0, 9))
        else:
            out += _listops_tree(rng, next(sizes), depth + 1, max_depth, max_args, leaf_p)
    out.append(LISTOPS_CLOSE)
    return out


def make_listops(
    n_samples: int, seq_len: int, *, vocab_size: int = LISTOPS_VOCAB, max_depth: int = 10, max_args: int = 5,
    leaf_p: float = 0.3, seed: int = 0,
) -> Batch:
    """ListOps: ``expression [PAD …] SEP``; the last position predicts the value 0-9 (class index).

    Expressions are random trees (depth ≤ ``max_depth``, 2..``max_args`` arguments per operator as in LRA,
    each argument a digit with probability ``leaf_p``) of at most a random budget in ``[seq_len/2, seq_len-1]``
    tokens, so lengths vary and there is always room for the final SEP.
    """
    where = "make_listops"
    _check_task_args(
        where, n_samples, seq_len, vocab_size, seed, min_len=5, min_vocab=LISTOPS_VOCAB,
        why_len="the shortest expression [OP d d ] and the final SEP",
        why_vocab=f"{N_SPECIAL} reserved ids, 10 digits, 4 operators and ']'",
    )
    check_positive_int(max_depth, "max_depth", where)
    if isinstance(max_args, bool) or not isinstance(max_args, int) or max_args < 2:
        raise ValueError(f"{where}: max_args must be an int >= 2, got {max_args!r}")
    if not isinstance(leaf_p, (int, float)) or not 0.0 <= leaf_p < 1.0:
        raise ValueError(f"{where}: leaf_p must be a probability in [0, 1), got {leaf_p!r}")
    rng = _Stream(seed)
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    rows, labels = [], []
    for _ in range(n_samples):
        # total length in [(L-1)/2, L-1] at most: varied lengths, little padding
        budget = rng.randint(max(4, seq_len // 2), seq_len - 1)
        expr = _listops_tree(rng, budget, 0, max_depth, max_args, float(leaf_p))
        rows.append(expr)
        labels.append(evaluate_listops(expr))
    for n, expr in enumerate(rows):
        inputs[n, : len(expr)] = torch.tensor(expr, dtype=torch.long)
    inputs[:, -1] = SEP
    targets[:, -1] = torch.tensor(labels, dtype=torch.long)
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# Bracket matching (Dyck languages)
# --------------------------------------------------------------------------------------------------------------


def is_balanced(tokens, n_types: int = 2) -> bool:
    """True when the bracket tokens (PAD and SEP skipped) form a balanced string: a stack of open types."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    stack: list[int] = []
    for tok in tokens:
        tok = int(tok)
        if tok in (PAD, SEP):
            continue
        kind, is_close = divmod(tok - BRACKET_OPEN0, 2)
        if not 0 <= kind < n_types:
            raise ValueError(f"is_balanced: token id {tok} is not a bracket of one of n_types={n_types} types")
        if not is_close:
            stack.append(kind)
        elif not stack or stack.pop() != kind:
            return False
    return not stack


def _dyck_word(rng: _Stream, m: int, n_types: int) -> list[int]:
    """A random balanced string of even length m: open with prob. 1/2 while both moves keep it completable."""
    out, stack = [], []
    for i in range(m):
        remaining = m - i
        if stack and (remaining == len(stack) or rng.random() < 0.5):
            out.append(BRACKET_OPEN0 + 2 * stack.pop() + 1)  # close the innermost open bracket
        else:
            kind = rng.randint(0, n_types - 1)
            stack.append(kind)
            out.append(BRACKET_OPEN0 + 2 * kind)
    return out


def _near_miss(rng: _Stream, word: list[int], n_types: int) -> list[int]:
    """Perturb a balanced string once: flip one bracket's direction, swap two, or change one bracket's type."""
    w = list(word)
    kinds = 3 if n_types > 1 else 2
    how = rng.randint(0, kinds - 1)
    i = rng.randint(0, len(w) - 1)
    if how == 0:  # "(" ↔ ")": the counts no longer match
        w[i] = BRACKET_OPEN0 + ((w[i] - BRACKET_OPEN0) ^ 1)  # offsets 2i (open) and 2i+1 (close) differ in bit 0
    elif how == 1:  # swap two positions: the depth may go negative on the way
        j = rng.randint(0, len(w) - 1)
        w[i], w[j] = w[j], w[i]
    else:  # "(" → "[": counts fine, the stack is not
        kind = (w[i] - BRACKET_OPEN0) // 2
        new = (kind + rng.randint(1, n_types - 1)) % n_types
        w[i] = BRACKET_OPEN0 + 2 * new + (w[i] - BRACKET_OPEN0) % 2
    return w


def make_brackets(
    n_samples: int, seq_len: int, *, vocab_size: int | None = None, n_types: int = 2, seed: int = 0
) -> Batch:
    """Bracket matching: ``brackets [PAD …] SEP``; the last position predicts 1 (balanced) or 0.

    Each sample is balanced with probability 1/2. Lengths are even, drawn in ``[M/2, M]`` with ``M`` the largest
    even number ≤ ``seq_len - 1``; unbalanced strings are near misses of balanced ones (same length), so the model
    cannot answer from the length. The label always comes from :func:`is_balanced`.
    ``vocab_size`` defaults to ``2 + 2 * n_types`` (PAD, SEP, then open/close per type).
    """
    where = "make_brackets"
    check_positive_int(n_types, "n_types", where)
    if vocab_size is None:
        vocab_size = N_SPECIAL + 2 * n_types
    _check_task_args(
        where, n_samples, seq_len, vocab_size, seed, min_len=3, min_vocab=N_SPECIAL + 2 * n_types,
        why_len="a pair of brackets and the final SEP",
        why_vocab=f"{N_SPECIAL} reserved ids and an open and a close id for each of n_types={n_types} types",
    )
    rng = _Stream(seed)
    big = (seq_len - 1) // 2  # pairs that fit: M = 2·big
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    labels = []
    for n in range(n_samples):
        m = 2 * rng.randint((big + 1) // 2, big)
        word = _dyck_word(rng, m, n_types)
        if rng.random() < 0.5:
            for _ in range(20):  # a swap can land on a balanced string again: retry (label is checked anyway)
                cand = _near_miss(rng, word, n_types)
                if not is_balanced(cand, n_types):
                    break
            word = cand
        labels.append(int(is_balanced(word, n_types)))
        inputs[n, :m] = torch.tensor(word, dtype=torch.long)
    inputs[:, -1] = SEP
    targets[:, -1] = torch.tensor(labels, dtype=torch.long)
    return Batch(inputs, targets)


# --------------------------------------------------------------------------------------------------------------
# The task registry
# --------------------------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Batch]] = {
    "copy": make_copy,
    "reverse": make_reverse,
    "sort": make_sort,
    "recall": make_associative_recall,
    "listops": make_listops,
    "brackets": make_brackets,
}

_DEFAULT_VOCAB = {"copy": 12, "reverse": 12, "sort": 12, "recall": 130, "listops": LISTOPS_VOCAB,
                  "brackets": N_SPECIAL + 2 * 2}


def _check_name(name, where):
    if not isinstance(name, str):
        raise TypeError(f"{where}: name must be a str, one of {', '.join(TASKS)}; got {type(name).__name__}")
    if name not in TASKS:
        raise ValueError(f"{where}: unknown task name {name!r}; valid names: {', '.join(TASKS)}")
    return name


def task_vocab_size(name: str) -> int:
    """The default ``vocab_size`` of task ``name`` (what its generator uses when none is given)."""
    return _DEFAULT_VOCAB[_check_name(name, "task_vocab_size")]


def make_task(name: str, n_samples: int, seq_len: int, *, seed: int = 0, **kw) -> Batch:
    """``TASKS[name](n_samples, seq_len, seed=seed, **kw)``, with a clear error for an unknown name."""
    return TASKS[_check_name(name, "make_task")](n_samples, seq_len, seed=seed, **kw)


def to_text(name: str, tokens) -> str:
    """Render a row of a task's tokens readably: symbols as numbers, PAD ``_``, SEP ``|``, ListOps/bracket glyphs."""
    _check_name(name, "to_text")
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    words = []
    for t in tokens:
        t = int(t)
        if t == PAD:
            words.append("_")
        elif t == SEP:
            words.append("|")
        elif name == "listops":
            words.append(LISTOPS_NAMES.get(t, str(t - LISTOPS_DIGIT0)))
        elif name == "brackets":
            kind, close = divmod(t - BRACKET_OPEN0, 2)
            words.append(BRACKET_CHARS[2 * kind + close] if kind < 4 else f"{'c' if close else 'o'}{kind}")
        else:
            words.append(str(t - FIRST_SYMBOL))
    return " ".join(words)


# --------------------------------------------------------------------------------------------------------------
# The tiny corpus: a seeded probabilistic grammar
# --------------------------------------------------------------------------------------------------------------

DEFAULT_CORPUS_PATH = Path(__file__).resolve().parent.parent / "data" / "tiny_corpus.txt"
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
    _check_seed(seed, "generate_corpus")
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
# Character tokenizer and language-model batches
# --------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character: ``itos`` = the sorted distinct characters of the text, ``stoi`` its inverse."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer: text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("CharTokenizer: text must not be empty")
        self.itos: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self):
        return len(self.itos)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> torch.Tensor:
        """``LongTensor (len(text),)`` of character ids; unknown characters raise ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode: text must be a str, got {type(text).__name__}")
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the vocabulary "
                             f"({self.vocab_size} characters)") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """The text of a 1-D ``LongTensor`` or a list of ids."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"CharTokenizer.decode: ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"CharTokenizer.decode: ids must be a 1-D tensor or a list of ints, "
                            f"got {type(ids).__name__}")
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"CharTokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return "".join(self.itos[int(i)] for i in ids)


def corpus_tokenizer(path=None) -> CharTokenizer:
    """The character tokenizer of the shipped corpus."""
    return CharTokenizer(load_corpus(path))


def _check_tokens(tokens, where):
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{where}: tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"{where}: tokens must be 1-D (N_total,), got shape {tuple(tokens.shape)}")
    if tokens.dtype != torch.long:
        raise TypeError(f"{where}: tokens must have dtype torch.long, got {tokens.dtype}")


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split: the first ``1 - val_fraction`` of the stream for training, the rest for validation.

    Contiguous, not shuffled windows: shuffled windows would overlap across the split and leak text.
    """
    _check_tokens(tokens, "train_val_split")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"train_val_split: val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_val = int(round(len(tokens) * val_fraction))
    if n_val == 0 or n_val == len(tokens):
        raise ValueError(f"train_val_split: val_fraction={val_fraction} of {len(tokens)} tokens leaves an empty part")
    return tokens[:-n_val], tokens[-n_val:]


def lm_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int = 0) -> Batch:
    """``batch_size`` random windows of ``seq_len + 1`` tokens: inputs = window[:-1], targets = window[1:]."""
    where = "lm_batch"
    _check_tokens(tokens, where)
    check_positive_int(batch_size, "batch_size", where)
    check_positive_int(seq_len, "seq_len", where)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{where}: seq_len must be < len(tokens)={len(tokens)} (a window holds seq_len + 1 "
                         f"tokens), got {seq_len}")
    g = _generator(seed, where)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)  # (B,)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]  # (B, L+1)
    return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())


# --------------------------------------------------------------------------------------------------------------
# python -m effedu.data [--regenerate]
# --------------------------------------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m effedu.data",
                                 description="Show the synthetic tasks, or regenerate data/tiny_corpus.txt.")
    ap.add_argument("--regenerate", action="store_true", help="rewrite data/tiny_corpus.txt from the grammar")
    ap.add_argument("--out", default=None, help="write the corpus here instead of data/tiny_corpus.txt")
    args = ap.parse_args(argv)
    if args.regenerate:
        p = write_corpus(args.out)
        print(f"wrote {p} ({p.stat().st_size} bytes, generate_corpus(n_sentences={DEFAULT_N_SENTENCES}, seed=0))")
        return
    for name in TASKS:
        b = make_task(name, 1, 24, seed=0)
        scored = b.targets[0][b.mask[0]]
        answer = f"label {scored.item()}" if name in NUM_CLASSES else to_text(name, scored)
        print(f"{name:9s} vocab={task_vocab_size(name):3d}  {to_text(name, b.inputs[0])}   -> scored: {answer}")
    text = load_corpus()
    print(f"corpus: {len(text)} characters, {CharTokenizer(text).vocab_size} distinct; first line:")
    print(text.splitlines()[0])


if __name__ == "__main__":
    _main()
