"""Conditional computation (chapter 14): early exit (DeeBERT, PABEE), ACT, depth-adaptive, the mixed task.

Oracles: batched early exit == a batch-of-one loop == the exit rules applied to the full forward; PABEE's patience
counter on hand-made predictions; entropy == ``torch.distributions.Categorical.entropy()``; ``act_weights`` ==
the step-by-step ``act_reference`` (weights sum to 1, ponder = N + R); depth-adaptive hidden states are copied
upward for exited tokens; the mixed-difficulty task's running sums recomputed by a plain loop.
"""
import math

import pytest
import torch

from _oracles import TOL
from effedu.data import IGNORE, PAD, make_task, task_vocab_size
from effedu.data import tasks as T
from effedu.general import conditional as C
from effedu.model import FeedForward, TransformerConfig, add_aux_loss, lm_loss


def cfg(**kw):
    c = dict(vocab_size=17, d_model=24, n_heads=2, n_layers=5, d_ff=40, max_len=32, causal=False)
    c.update(kw)
    return TransformerConfig(**c)


def toks(B=7, T_=13, V=17, seed=0, pad_tail=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (B, T_), generator=g)
    if pad_tail:  # rows of different lengths: a PAD tail
        for b in range(B):
            x[b, T_ - (b % 4):] = PAD
    return x


def spiky_classifier(pool="mean", seed=0, **kw):
    """A float64 model whose classifiers give varied, confident-to-unsure logits (so exits spread over layers)."""
    torch.manual_seed(seed)
    m = C.EarlyExitClassifier(cfg(**kw), 4, pool=pool).double().eval()
    with torch.no_grad():
        for lin in m.classifiers:
            lin.weight.normal_(0, 0.6)
    return m


def midpoints(values, k):
    """k thresholds strictly between distinct sorted values (never on a tie)."""
    v = torch.unique(values.detach().flatten()).sort().values
    idx = torch.linspace(0, len(v) - 2, k).round().long()
    return [float((v[i] + v[i + 1]) / 2) for i in idx]


# ---------------------------------------------------------------------------------------------------------------
# early exit
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", C.POOLS)
def test_batched_early_exit_equals_loop_and_rules_on_full_logits(pool):
    m = spiky_classifier(pool)
    x = toks(B=9)
    full = m(x)  # (L, B, C)
    assert full.shape == (5, 9, 4)
    spread = False
    cases = [("entropy", {"threshold": t}) for t in [0.0, *midpoints(C.entropy(full), 5), 50.0]]
    cases += [("patience", {"patience": p}) for p in (1, 2, 3, 4, 7)]
    for rule, kw in cases:
        z, e, stats = C.early_exit_infer(m, x, rule=rule, return_stats=True, **kw)
        e_ref, z_ref = C.apply_exit_rule(full, rule=rule, **kw)
        assert e.dtype == torch.int64 and e.shape == (9,)
        assert torch.equal(e, e_ref), (rule, kw)
        torch.testing.assert_close(z, z_ref, **TOL[torch.float64])
        z_loop, e_loop = C.early_exit_loop(m, x, rule=rule, **kw)
        assert torch.equal(e_loop, e)
        torch.testing.assert_close(z_loop, z, **TOL[torch.float64])
        # compute: layer j ran on the examples that had not left before it
        assert stats["rows_per_layer"] == [int((e >= j).sum()) for j in range(5)]
        assert stats["layers_run"] == int((e + 1).sum()) and stats["full"] == 45
        spread |= len(set(e.tolist())) >= 3
    assert spread  # some threshold really split the batch over layers
    assert torch.equal(C.exit_by_entropy(full, 0.0)[0], torch.full((9,), 4))  # entropy ≥ 0: never below 0
    assert torch.equal(C.exit_by_entropy(full, 50.0)[0], torch.zeros(9, dtype=torch.long))


def test_mean_pool_ignores_pad_per_example():
    m = spiky_classifier("mean")
    x = toks(B=4)
    h = torch.randn(4, x.shape[1], 24, dtype=torch.float64)
    keep = (x != PAD).double()
    pooled = torch.stack([h[b][keep[b].bool()].mean(0) for b in range(4)])
    expected = m.classifiers[1](m.norms[1](pooled))
    torch.testing.assert_close(m.classify(1, h, x), expected, **TOL[torch.float64])
    torch.testing.assert_close(m.classify(1, h[2:3], x[2:3]), expected[2:3], **TOL[torch.float64])


def test_patience_counting_on_hand_made_logits():
    preds = torch.tensor([[0, 0, 0, 1, 1, 1],  # counters 0 1 2 0 1 2
                          [0, 1, 1, 1, 1, 1],  # 0 0 1 2 3 4
                          [0, 1, 0, 1, 0, 1],  # never agrees
                          [2, 2, 2, 2, 2, 2]]).T  # (L=6, B=4)
    logits = torch.nn.functional.one_hot(preds, 3).double() * 3.0
    assert C.patience_counters(logits).T.tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4], [0] * 6,
                                                       [0, 1, 2, 3, 4, 5]]
    expect = {1: [1, 2, 5, 1], 2: [2, 3, 5, 2], 3: [5, 4, 5, 3], 6: [5, 5, 5, 5]}
    for patience, exits in expect.items():
        e, z = C.exit_by_patience(logits, patience)
        assert e.tolist() == exits, patience
        assert torch.equal(z, logits[e, torch.arange(4)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_matches_categorical(dtype):
    z = torch.randn(3, 5, 7, dtype=dtype) * 3
    ref = torch.distributions.Categorical(logits=z).entropy()
    torch.testing.assert_close(C.entropy(z), ref, **TOL[dtype])
    assert math.isclose(float(C.entropy(torch.zeros(11, dtype=dtype))), math.log(11), rel_tol=1e-6)
    z[0, 0, :3] = -math.inf  # zero probabilities: 0·log 0 = 0
    h = C.entropy(z)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[0, 0], C.entropy(z[0, 0, 3:]), **TOL[dtype])


def test_early_exit_loss_is_pabee_weighting_and_training_lowers_it():
    torch.manual_seed(0)
    m = C.EarlyExitClassifier(cfg(n_layers=3), 2, pool="last")
    batch = make_task("brackets", 32, 12, seed=0)
    y = C.class_labels(batch.targets)
    assert y.shape == (32,) and set(y.tolist()) <= {0, 1}
    z = m(batch.inputs)
    per = [torch.nn.functional.cross_entropy(z[j], y) for j in range(3)]
    torch.testing.assert_close(C.early_exit_loss(z, batch.targets), (1 * per[0] + 2 * per[1] + 3 * per[2]) / 6)
    hist = C.train_early_exit(m, batch, steps=25, lr=3e-3, progress=False)
    assert len(hist["loss"]) == 25 and hist["loss"][-1] < hist["loss"][0]
    assert len(C.per_layer_accuracy(m(batch.inputs), y)) == 3
    curve = C.exit_tradeoff(m(batch.inputs).detach(), y, rule="patience", values=[1, 2])
    assert all(1 <= a <= 3 for a in curve["average_layers"]) and len(curve["accuracy"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# ACT
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.99, 0.5, 1.0])
def test_act_weights_equal_reference(threshold):
    g = torch.Generator().manual_seed(1)
    p = torch.rand(6, 200, generator=g, dtype=torch.float64) * 0.6
    w, n, r = C.act_weights(p, threshold)
    w_ref, n_ref, r_ref = C.act_reference(p, threshold)
    assert n.dtype == torch.int64 and torch.equal(n, n_ref)
    torch.testing.assert_close(w, w_ref, **TOL[torch.float64])
    torch.testing.assert_close(r, r_ref, **TOL[torch.float64])
    torch.testing.assert_close(w.sum(0), torch.ones(200, dtype=torch.float64), **TOL[torch.float64])
    assert len(set(n.tolist())) >= 2  # halting steps differ between positions
    # the ponder cost N + R: R is the weight at the halting step, the earlier weights are the probabilities
    torch.testing.assert_close(r, w[n - 1, torch.arange(200)], **TOL[torch.float64])
    torch.testing.assert_close(1.0 - r, (p * (torch.arange(6).unsqueeze(1) < n - 1)).sum(0), **TOL[torch.float64])


def test_act_weights_edge_cases():
    p = torch.tensor([[0.995, 0.1, 0.3],
                      [0.5, 0.2, 0.69],
                      [0.5, 0.2, 0.5]], dtype=torch.float64)
    w, n, r = C.act_weights(p, 0.99)
    # column 0: first prob ≥ threshold → halts at step 1 with R = 1
    # column 1: never reaches 0.99 within 3 steps → the last step takes the remainder 1 − 0.3
    # column 2: 0.3 + 0.69 = 0.99 ≥ 0.99 → halts at step 2, R = 0.7
    assert n.tolist() == [1, 3, 2]
    torch.testing.assert_close(r, torch.tensor([1.0, 0.7, 0.7], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.1, 0.3], [0.0, 0.2, 0.7], [0.0, 0.7, 0.0]],
                                               dtype=torch.float64))
    for got, want in zip((w, n, r), C.act_reference(p, 0.99)):
        torch.testing.assert_close(got, want)
    # gradients: ∂R/∂h_n = −1 for the steps before the halt, 0 after
    q = p.clone().requires_grad_(True)
    C.act_weights(q, 0.99)[2].sum().backward()
    assert q.grad[:, 1].tolist() == [-1.0, -1.0, 0.0] and q.grad[:, 2].tolist() == [-1.0, 0.0, 0.0]


def test_act_transformer_ponder_and_gradients_reach_the_halting_unit():
    torch.manual_seed(0)
    m = C.ACTTransformer(cfg(causal=True), max_steps=4, threshold=0.99, ponder_weight=0.1)
    x = toks(B=3, T_=9, pad_tail=False)
    logits = m(x)
    assert logits.shape == (3, 9, 17)
    assert m.last_n_updates.shape == (3, 9) and m.last_n_updates.dtype == torch.int64
    assert int(m.last_n_updates.min()) >= 1 and int(m.last_n_updates.max()) <= 4
    S = m.last_halt_probs.shape[0]
    w, n, r = C.act_reference(m.last_halt_probs.reshape(S, -1), 0.99)
    torch.testing.assert_close(m.last_ponder, (n + r).view(3, 9).float(), **TOL[torch.float32])
    torch.testing.assert_close(m.aux_loss(), 0.1 * m.last_ponder.mean(), **TOL[torch.float32])
    (lm_loss(logits, x) + m.aux_loss()).backward()
    assert m.halt.weight.grad is not None and float(m.halt.weight.grad.abs().sum()) > 0
    assert float(m.step_emb.weight.grad.abs().sum()) > 0


def test_act_transformer_one_step_is_the_block():
    torch.manual_seed(0)
    m = C.ACTTransformer(cfg(), max_steps=1).double()
    x = toks(B=2, T_=6, pad_tail=False)
    s = m.tok_emb(x) + m.pos_emb(torch.arange(6)) + m.step_emb.weight[0]
    torch.testing.assert_close(m(x), m.head(m.ln_f(m.block(s))), **TOL[torch.float64])
    assert torch.equal(m.last_n_updates, torch.ones(2, 6, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# depth-adaptive
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_depth_adaptive_copies_exited_states_upward():
    torch.manual_seed(0)
    m = C.DepthAdaptiveTransformer(cfg(causal=True), threshold=0.5).double().eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)
    x = toks(B=4, T_=11, pad_tail=False)
    conf = torch.softmax(m.per_layer_logits(x), -1).amax(-1)  # (L, B, T) without copying
    t = midpoints(conf[0], 3)[1]  # about half the tokens leave after layer 1
    logits, e, hidden = m(x, threshold=t, return_hidden=True)
    assert e.shape == (4, 11) and len(hidden) == 6
    assert 0 < int((e == 0).sum()) < 44 and int((e == 4).sum()) > 0
    for b in range(4):
        for i in range(11):
            j = int(e[b, i])
            for later in range(j + 2, 6):  # hidden[j + 1] is the output of block j, where it exited
                assert torch.equal(hidden[later][b, i], hidden[j + 1][b, i])
    moved = [not torch.equal(hidden[2][b, i], hidden[1][b, i]) for b in range(4) for i in range(11) if e[b, i] > 0]
    assert all(moved)
    torch.testing.assert_close(logits, m.logits(hidden[-1]), **TOL[torch.float64])
    # exit where the shared head was first confident enough (on the states the model actually had)
    for b in range(4):
        for i in range(11):
            j = int(e[b, i])
            c = [float(torch.softmax(m.logits(hidden[k + 1][b, i]), -1).max()) for k in range(5)]
            assert all(ck < t for ck in c[:j]) and (j == 4 or c[j] >= t)


def test_depth_adaptive_full_depth_when_threshold_above_one_and_in_training():
    torch.manual_seed(0)
    m = C.DepthAdaptiveTransformer(cfg(), threshold=1.5).double()
    x = toks(B=3, T_=8, pad_tail=False)
    m.eval()
    logits, e = m(x)
    assert torch.equal(e, torch.full((3, 8), 4))
    torch.testing.assert_close(logits, m.per_layer_logits(x)[-1], **TOL[torch.float64])
    m.train()
    logits_t, e_t = m(x, threshold=1e-3)  # training mode ignores the threshold: every layer runs
    assert torch.equal(e_t, torch.full((3, 8), 4))
    torch.testing.assert_close(logits_t, logits, **TOL[torch.float64])


def test_depth_adaptive_training_step():
    torch.manual_seed(0)
    batch = T.make_mixed_difficulty(16, 20, seed=0)
    m = C.DepthAdaptiveTransformer(cfg(vocab_size=14, n_layers=2, causal=True), threshold=0.9)
    z = m.per_layer_logits(batch.inputs)
    torch.testing.assert_close(C.depth_adaptive_loss(z, batch.targets),
                               lm_loss(z[0], batch.targets) + lm_loss(z[1], batch.targets))
    hist = C.train_depth_adaptive(m, batch, steps=15, progress=False)
    assert hist["loss"][-1] < hist["loss"][0]
    curve = C.depth_tradeoff(m, batch, [0.5, 2.0])
    assert curve["average_layers"][1] == 2.0 and curve["average_layers"][0] <= 2.0


# ---------------------------------------------------------------------------------------------------------------
# the mixed-difficulty task
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,modulus", [(2, 10), (7, 10), (40, 5)])
def test_mixed_difficulty_labels_by_a_plain_loop(seq_len, modulus):
    batch, hard = T.make_mixed_difficulty(30, seq_len, modulus=modulus, seed=3, return_difficulty=True)
    assert batch.inputs.shape == batch.targets.shape == hard.shape == (30, seq_len)
    d0 = T.MIXED_DIGIT0
    n_hard = n_easy = 0
    for x, y, h in zip(batch.inputs.tolist(), batch.targets.tolist(), hard.tolist()):
        kind, total = None, 0
        for tok, tgt, is_hard in zip(x, y, h):
            if tok in (T.MIXED_COPY, T.MIXED_SUM):
                kind, total = tok, 0
                assert tgt == IGNORE and not is_hard
            elif tok == PAD:
                assert tgt == IGNORE and not is_hard
            else:
                assert kind is not None and d0 <= tok < d0 + modulus
                total = (total + tok - d0) % modulus
                want = tok if kind == T.MIXED_COPY else d0 + total
                assert tgt == want and is_hard == (kind == T.MIXED_SUM)
                n_hard += is_hard
                n_easy += not is_hard
    if seq_len >= 40:
        assert n_hard > 100 and n_easy > 100
    assert torch.equal(batch.inputs, make_task("mixed", 30, seq_len, modulus=modulus, seed=3).inputs)
    assert task_vocab_size("mixed") == d0 + 10


class _RecordingFFN(FeedForward):
    def forward(self, x):
        add_aux_loss(self, x.pow(2).mean())
        return super().forward(x)


@pytest.mark.parametrize("make", [lambda c: C.EarlyExitClassifier(c, 3), C.DepthAdaptiveTransformer,
                                  C.ACTTransformer])
def test_ffn_factories_record_aux_losses_once_per_forward(make):
    c = cfg(n_layers=2, ffn=lambda config, i: _RecordingFFN(config.d_model, config.d_ff))
    m = make(c)
    x = toks(B=2, T_=5, pad_tail=False)
    m(x)
    first = m.aux_loss()
    m(x)
    torch.testing.assert_close(m.aux_loss(), first)  # cleared at each forward, not accumulated
    assert len(m.aux_channel.values) >= 2 and float(first.detach()) > 0


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors():
    full = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="threshold must be >= 0.*nats"):
        C.exit_by_entropy(full, -0.1)
    with pytest.raises(ValueError, match="patience must be an int ≥ 1"):
        C.exit_by_patience(full, 0)
    with pytest.raises(TypeError, match="patience must be an int"):
        C.exit_by_patience(full, 1.5)
    with pytest.raises(ValueError, match="per_layer_logits must be a non-empty \\(L, B, C\\)"):
        C.exit_by_entropy(full[0], 1.0)
    for bad in (0.0, 1.01, -0.5):
        with pytest.raises(ValueError, match="threshold must be in \\(0, 1\\]"):
            C.act_weights(torch.rand(3, 4), bad)
        with pytest.raises(ValueError, match="threshold must be in \\(0, 1\\]"):
            C.ACTTransformer(cfg(), threshold=bad)
    with pytest.raises(ValueError, match="halt_probs must lie in \\[0, 1\\]"):
        C.act_weights(torch.tensor([[0.5, 1.2]]))
    with pytest.raises(ValueError, match="halt_probs must lie in \\[0, 1\\]"):
        C.act_reference(torch.tensor([[-0.1, 0.2]]))
    with pytest.raises(ValueError, match="halt_probs contains NaN"):
        C.act_weights(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match="n_classes must be an int ≥ 2"):
        C.EarlyExitClassifier(cfg(), 1)
    with pytest.raises(ValueError, match="unknown pool"):
        C.EarlyExitClassifier(cfg(), 3, pool="max")
    m = C.EarlyExitClassifier(cfg(), 3)
    with pytest.raises(ValueError, match="unknown rule 'depth'"):
        C.early_exit_infer(m, toks(), rule="depth", threshold=1.0)
    with pytest.raises(ValueError, match="rule='entropy' needs threshold"):
        C.early_exit_infer(m, toks(), rule="entropy")
    with pytest.raises(ValueError, match="threshold must be >= 0.*nats"):
        C.early_exit_infer(m, toks(), rule="entropy", threshold=-1.0)
    with pytest.raises(ValueError, match="patience must be an int ≥ 1"):
        C.early_exit_infer(m, toks(), rule="patience", patience=0)
    with pytest.raises(ValueError, match="unknown rule 'entropy'"):
        C.DepthAdaptiveTransformer(cfg(), rule="entropy")
    with pytest.raises(ValueError, match="threshold must be > 0"):
        C.DepthAdaptiveTransformer(cfg(), threshold=0.0)
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        C.ACTTransformer({"d_model": 8})
    with pytest.raises(ValueError, match="exactly one scored position"):
        C.early_exit_loss(torch.randn(2, 3, 4), torch.full((3, 5), IGNORE))
    with pytest.raises(ValueError, match="modulus must be >= 2"):
        T.make_mixed_difficulty(2, 8, modulus=1)
    with pytest.raises(ValueError, match="vocab_size must be >= 14"):
        T.make_mixed_difficulty(2, 8, vocab_size=12)
    with pytest.raises(ValueError, match="p_hard must be a probability"):
        T.make_mixed_difficulty(2, 8, p_hard=1.5)
