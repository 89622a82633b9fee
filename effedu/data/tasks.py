"""Seven synthetic tasks: six that probe attention (copy, reverse, sort, associative recall, ListOps, brackets) and
one of mixed difficulty for per-token depth (chapter 14).

Made in code, in seconds, with nothing downloaded. Each task isolates one thing attention has to do, so that when a
faster or lighter variant (sparse, low-rank, kernelised, pruned, quantised ...) loses accuracy, we can say *which*
ability it lost.

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

``mixed`` (mixed difficulty, chapter 14) — spans ``COPY d d …`` and ``SUM d d …`` tagged token by token: in a
    copy span each digit's target is itself (easy: the first layer can answer), in a sum span it is the running
    sum modulo ``modulus`` since the marker (hard: it counts over the span). A test bed for per-token depth;
    ``make_mixed_difficulty(..., return_difficulty=True)`` also returns which tokens are hard.

For the two classification tasks the target at the last position is the *class index* (0-9 for ListOps, 0/1 for
brackets), not a token id; it is below every task's vocabulary size, so either a classification head with
``NUM_CLASSES[name]`` outputs or the LM head works.

Token ids. The first ids of every vocabulary are reserved: ``PAD = 0`` (padding, never scored) and
``SEP = 1`` (separates prompt and answer; at the last position of ListOps/brackets it is the "answer now"
marker, like a CLS token placed at the end so a causal model has read everything). Task tokens follow from
``FIRST_SYMBOL = 2`` on; the ListOps and bracket layouts are the ``LISTOPS_*`` / ``BRACKET_*`` constants below.
A generator asked for a ``vocab_size`` too small for its layout, or a ``seq_len`` too short to hold one example,
raises a ``ValueError`` that says what the minimum is.

Determinism: every random choice takes ``seed=`` and draws from a local ``torch.Generator``, never from a global
RNG: the same call gives the same tensors on every run and every machine, whatever else the notebook did before.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._checks import check_choice, check_positive_int, check_seed
from ..model import IGNORE  # target of every unscored position (F.cross_entropy's default ignore_index, -100)

# --------------------------------------------------------------------------------------------------------------
# Token layout and the batch type
# --------------------------------------------------------------------------------------------------------------

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


def _generator(seed, where):
    return torch.Generator().manual_seed(check_seed(seed, where))


def _check_task_args(where, n_samples, seq_len, vocab_size, seed, *, min_len, min_vocab, why_len, why_vocab):
    check_positive_int(n_samples, "n_samples", where)
    check_positive_int(seq_len, "seq_len", where)
    check_positive_int(vocab_size, "vocab_size", where)
    check_seed(seed, where)
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
# Mixed difficulty (chapter 14, depth-adaptive Transformers): easy copy spans and hard running-sum spans
# --------------------------------------------------------------------------------------------------------------

MIXED_COPY = FIRST_SYMBOL  # marker that opens a copy span (easy tokens)
MIXED_SUM = FIRST_SYMBOL + 1  # marker that opens a running-sum span (hard tokens)
MIXED_DIGIT0 = FIRST_SYMBOL + 2  # digit d (0 ≤ d < modulus) has id MIXED_DIGIT0 + d


def make_mixed_difficulty(
    n_samples: int, seq_len: int, *, vocab_size: int | None = None, modulus: int = 10, max_span: int = 6,
    p_hard: float = 0.5, seed: int = 0, return_difficulty: bool = False,
):
    """Easy and hard tokens in one sequence, a per-token tagging task (depth-adaptive models, chapter 14).

    The sequence is a run of spans ``MARKER d_1 … d_k`` (1 ≤ k ≤ ``max_span`` digits in ``0 … modulus−1``,
    the last span cut at ``seq_len``, a final lone position PAD); every digit position is scored:

    * ``COPY`` span (easy): the target at ``d_i`` is ``d_i`` itself — the token the model reads at that position;
    * ``SUM`` span (hard): the target at ``d_i`` is the running sum ``(d_1 + … + d_i) mod modulus`` — the position
      must gather every earlier digit of its span (back to the marker), a counting task.

    Targets are digit token ids (``MIXED_DIGIT0 + value``), so the LM head of a ``vocab_size`` model scores them;
    markers and PAD are ``IGNORE``. A causal model can solve both (position i needs only positions ≤ i).
    Each span is hard with probability ``p_hard``. ``vocab_size`` defaults to ``4 + modulus`` (PAD, SEP, the two
    markers, the digits). ``return_difficulty=True`` returns ``(batch, hard)`` with ``hard`` a ``BoolTensor
    (N, L)``, True at the scored positions of SUM spans (the easy ones: ``batch.mask & ~hard``).
    """
    where = "make_mixed_difficulty"
    check_positive_int(modulus, "modulus", where)
    if modulus < 2:
        raise ValueError(f"{where}: modulus must be >= 2, got {modulus}")
    check_positive_int(max_span, "max_span", where)
    if isinstance(p_hard, bool) or not isinstance(p_hard, (int, float)) or not 0.0 <= p_hard <= 1.0:
        raise ValueError(f"{where}: p_hard must be a probability in [0, 1], got {p_hard!r}")
    if vocab_size is None:
        vocab_size = MIXED_DIGIT0 + modulus
    _check_task_args(
        where, n_samples, seq_len, vocab_size, seed, min_len=2, min_vocab=MIXED_DIGIT0 + modulus,
        why_len="a marker and one digit",
        why_vocab=f"{N_SPECIAL} reserved ids, the COPY and SUM markers and modulus={modulus} digits",
    )
    rng = _Stream(seed)
    inputs = torch.full((n_samples, seq_len), PAD, dtype=torch.long)
    targets = torch.full((n_samples, seq_len), IGNORE, dtype=torch.long)
    hard = torch.zeros((n_samples, seq_len), dtype=torch.bool)
    rows_in, rows_tg, rows_hard = [], [], []
    for _ in range(n_samples):
        x, y, h = [], [], []
        while seq_len - len(x) >= 2:
            is_hard = rng.random() < p_hard
            k = min(rng.randint(1, max_span), seq_len - len(x) - 1)
            x.append(MIXED_SUM if is_hard else MIXED_COPY)
            y.append(IGNORE)
            h.append(False)
            total = 0
            for _ in range(k):
                d = rng.randint(0, modulus - 1)
                total = (total + d) % modulus
                x.append(MIXED_DIGIT0 + d)
                y.append(MIXED_DIGIT0 + (total if is_hard else d))
                h.append(is_hard)
        rows_in.append(x)
        rows_tg.append(y)
        rows_hard.append(h)
    for n in range(n_samples):
        m = len(rows_in[n])
        inputs[n, :m] = torch.tensor(rows_in[n], dtype=torch.long)
        targets[n, :m] = torch.tensor(rows_tg[n], dtype=torch.long)
        hard[n, :m] = torch.tensor(rows_hard[n], dtype=torch.bool)
    batch = Batch(inputs, targets)
    return (batch, hard) if return_difficulty else batch


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
    "mixed": make_mixed_difficulty,
}

_DEFAULT_VOCAB = {"copy": 12, "reverse": 12, "sort": 12, "recall": 130, "listops": LISTOPS_VOCAB,
                  "brackets": N_SPECIAL + 2 * 2, "mixed": MIXED_DIGIT0 + 10}


def task_vocab_size(name: str) -> int:
    """The default ``vocab_size`` of task ``name`` (what its generator uses when none is given)."""
    return _DEFAULT_VOCAB[check_choice(name, TASKS, "task name", "task_vocab_size")]


def make_task(name: str, n_samples: int, seq_len: int, *, seed: int = 0, **kw) -> Batch:
    """``TASKS[name](n_samples, seq_len, seed=seed, **kw)``, with a clear error for an unknown name."""
    return TASKS[check_choice(name, TASKS, "task name", "make_task")](n_samples, seq_len, seed=seed, **kw)


def to_text(name: str, tokens) -> str:
    """Render a row of a task's tokens readably: symbols as numbers, PAD ``_``, SEP ``|``, ListOps/bracket glyphs."""
    check_choice(name, TASKS, "task name", "to_text")
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
        elif name == "mixed":
            words.append({MIXED_COPY: "C", MIXED_SUM: "S"}.get(t, str(t - MIXED_DIGIT0)))
        elif name == "brackets":
            kind, close = divmod(t - BRACKET_OPEN0, 2)
            words.append(BRACKET_CHARS[2 * kind + close] if kind < 4 else f"{'c' if close else 'o'}{kind}")
        else:
            words.append(str(t - FIRST_SYMBOL))
    return " ".join(words)


