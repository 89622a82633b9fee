"""Knowledge distillation (effedu.general.distill) against F.kl_div / F.cross_entropy / F.mse_loss oracles."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effedu.general import distill as D
from effedu.model import IGNORE, Transformer, TransformerConfig
from effedu.pretrained import BertEncoder, minilm_config

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def oracle_kd(s, t, y=None, T=2.0, alpha=0.5, ignore_index=IGNORE):
    V = s.shape[-1]
    s, t = s.reshape(-1, V), t.reshape(-1, V)
    if y is None:
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") * T * T
    y = y.reshape(-1)
    keep = y != ignore_index
    soft = F.kl_div(F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1), log_target=True,
                    reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, y, ignore_index=ignore_index)


def logits(*shape, dtype=torch.float64, seed=0, scale=3.0):
    return scale * torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 11), (3, 5, 7), (1, 1, 13), (2, 17, 1), (2, 3, 4, 5)])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 7.0])
def test_kd_loss_matches_kl_div_oracle(dtype, shape, T):
    s, t = logits(*shape, dtype=dtype), logits(*shape, dtype=dtype, seed=1)
    torch.testing.assert_close(D.kd_loss(s, t, T=T), oracle_kd(s, t, T=T), **TOL[dtype])
    y = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(2))
    y.view(-1)[0] = IGNORE  # one row left out of both terms
    if (y != IGNORE).any():
        for alpha in (0.0, 0.3, 1.0):
            torch.testing.assert_close(D.kd_loss(s, t, y, T=T, alpha=alpha), oracle_kd(s, t, y, T, alpha),
                                       **TOL[dtype])


def test_kd_loss_gradients_match_oracle_and_teacher_is_detached():
    s = logits(3, 6, 9).requires_grad_()
    t = logits(3, 6, 9, seed=1).requires_grad_()
    y = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(3))
    y[0, :4] = IGNORE
    (g,) = torch.autograd.grad(D.kd_loss(s, t, y, T=3.0, alpha=0.7), s)
    (g_ref,) = torch.autograd.grad(oracle_kd(s, t.detach(), y, 3.0, 0.7), s)
    torch.testing.assert_close(g, g_ref)
    assert g[0, :4].abs().max() == 0  # ignored rows get no gradient from either term
    D.kd_loss(s, t, y).backward()
    assert t.grad is None and s.grad is not None


def test_kd_loss_without_targets_ignores_alpha_and_ignored_rows_leave_the_soft_term():
    s, t = logits(5, 8), logits(5, 8, seed=1)
    assert torch.equal(D.kd_loss(s, t, T=2.0, alpha=0.1), D.kd_loss(s, t, T=2.0, alpha=0.9))
    y = torch.tensor([IGNORE, IGNORE, 1, 2, 3])
    kept = D.kd_loss(s, t, y, T=2.0, alpha=1.0)
    torch.testing.assert_close(kept, D.kd_loss(s[2:], t[2:], T=2.0))
    assert not torch.allclose(kept, D.kd_loss(s, t, T=2.0))
    assert float(D.kd_loss(s, s.clone(), T=3.0)) == pytest.approx(0.0, abs=1e-12)  # KL(p ‖ p) = 0


def test_kd_loss_half_precision_is_computed_in_float32():
    s, t = logits(4, 6, 50, dtype=torch.float32), logits(4, 6, 50, dtype=torch.float32, seed=1)
    for dt in (torch.float16, torch.bfloat16):
        out = D.kd_loss(s.to(dt), t.to(dt), T=2.0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, oracle_kd(s.to(dt).float(), t.to(dt).float()), rtol=1e-4, atol=1e-5)


def test_soft_term_gradient_scales_as_one_over_T_squared():
    s, t = logits(6, 10, scale=1.0), logits(6, 10, seed=1, scale=1.0)
    norms = {T: D.soft_gradient_norm(s, t, T) for T in (1, 2, 4, 8, 16, 32, 64)}
    scaled = [norms[T] * T * T for T in (4, 8, 16, 32, 64)]
    assert max(scaled) / min(scaled) < 1.05, scaled          # ‖∇‖·T² ≈ constant
    assert norms[8] / norms[16] == pytest.approx(4.0, rel=0.05)  # halving 1/T quarters the gradient
    # the closed form: ∂/∂s (1/N) Σ KL(p_T(t) ‖ p_T(s)) = (p_T(s) − p_T(t)) / (N T)
    for T in (1, 3):
        closed = (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)) / (s.shape[0] * T)
        assert norms.get(T, D.soft_gradient_norm(s, t, T)) == pytest.approx(float(closed.norm()), rel=1e-9)


def test_soften():
    z = logits(3, 7)
    p = D.soften(z, 1.0)
    torch.testing.assert_close(p, torch.softmax(z, -1))
    torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=z.dtype))
    # hotter = flatter: the entropy grows with T, towards log V
    ent = [float(-(q * q.log()).sum(-1).mean()) for q in (D.soften(z, T) for T in (0.5, 1, 2, 8, 1000))]
    assert ent == sorted(ent) and ent[-1] == pytest.approx(math.log(7), rel=1e-4)


@pytest.mark.parametrize("call, match", [
    (lambda s, t: D.kd_loss(s, t, T=0), "T .*> 0"),
    (lambda s, t: D.kd_loss(s, t, T=-1.0), "T .*> 0"),
    (lambda s, t: D.kd_loss(s, t, T=float("nan")), "T .*> 0"),
    (lambda s, t: D.kd_loss(s, t, T=True), "T .*number"),
    (lambda s, t: D.kd_loss(s, t, alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda s, t: D.kd_loss(s, t, alpha=-0.1), r"alpha must be in \[0, 1\]"),
    (lambda s, t: D.kd_loss(s, t[:, :3]), "same shape"),
    (lambda s, t: D.kd_loss(s.long(), t), "floating-point"),
    (lambda s, t: D.kd_loss([1.0], t), "torch.Tensor"),
    (lambda s, t: D.kd_loss(s, t.masked_fill(t > 1, float("nan"))), "NaN or inf"),
    (lambda s, t: D.kd_loss(s, t, torch.full((4,), IGNORE)), "every target is ignore_index"),
    (lambda s, t: D.kd_loss(s, t, torch.tensor([0, 1, 2, 9])), r"targets must lie in \[0, V=5\)"),
    (lambda s, t: D.kd_loss(s, t, torch.zeros(4)), "integer tensor"),
    (lambda s, t: D.kd_loss(s, t, torch.zeros(3, dtype=torch.long)), "targets must have shape"),
    (lambda s, t: D.soften(s, 0.0), "T .*> 0"),
])
def test_bad_input_errors(call, match):
    s, t = logits(4, 5), logits(4, 5, seed=1)
    with pytest.raises((ValueError, TypeError), match=match):
        call(s, t)


# ------------------------------------------------------------------------------------------------------------
# students from teachers
# ------------------------------------------------------------------------------------------------------------

def tiny_teacher(n_layers=4, n_heads=2):
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=19, d_model=16, n_heads=n_heads, n_layers=n_layers, d_ff=32,
                                         max_len=12)).eval()


def small_bert(n_layers=4):
    torch.manual_seed(0)
    return BertEncoder(minilm_config(vocab_size=50, d_model=16, n_heads=4, n_layers=n_layers, d_ff=32,
                                     max_len=16)).eval()


def test_student_with_all_layers_equals_teacher():
    x = torch.randint(0, 19, (3, 11), generator=torch.Generator().manual_seed(0))
    teacher = tiny_teacher()
    student = D.student_from_teacher(teacher, range(4))
    assert torch.equal(student(x), teacher(x))
    bert = small_bert()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert torch.equal(D.student_from_teacher(bert, [0, 1, 2, 3])(ids, attention_mask=mask),
                       bert(ids, attention_mask=mask))


def test_student_keeps_the_listed_layers_as_an_independent_copy():
    teacher = tiny_teacher(n_heads=[2, 4, 2, 1])
    student = D.student_from_teacher(teacher, [0, 2])
    assert student.config.n_layers == 2 and len(student.blocks) == 2 and student.config.n_heads == [2, 2]
    assert teacher.config.n_layers == 4 and len(teacher.blocks) == 4
    x = torch.randint(0, 19, (2, 7), generator=torch.Generator().manual_seed(0))
    h = teacher.embed_tokens(x)
    for i in (0, 2):  # the same computation by hand, through the teacher's layers 0 and 2
        h = teacher.blocks[i](h)
    torch.testing.assert_close(student(x), teacher.logits(h))
    with torch.no_grad():
        student.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    assert D.alternate_layers(6, 3) == [0, 2, 4] and D.alternate_layers(6, 2) == [0, 3] and D.alternate_layers(6, 1) == [0]


@pytest.mark.parametrize("layers, err, match", [
    ([], ValueError, "at least one"), ([0, 4], ValueError, "does not exist"), ([2, 1], ValueError, "increasing"),
    ([1, 1], ValueError, "increasing"), (2, TypeError, "list of 0-based"), ([0, 1.0], TypeError, "ints"),
    ([-1], ValueError, "does not exist"),
])
def test_student_from_teacher_errors(layers, err, match):
    with pytest.raises(err, match=match):
        D.student_from_teacher(tiny_teacher(), layers)
    with pytest.raises(TypeError, match="teacher must be"):
        D.student_from_teacher(nn.Linear(2, 2), [0])


# ------------------------------------------------------------------------------------------------------------
# intermediate losses
# ------------------------------------------------------------------------------------------------------------

def test_hidden_state_loss_matches_mse_with_and_without_projection():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]
    ht = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(5)]
    got = D.hidden_state_loss(hs, ht, {1: 2, 2: 4})
    torch.testing.assert_close(got, (F.mse_loss(hs[1], ht[2]) + F.mse_loss(hs[2], ht[4])) / 2)
    proj = nn.Linear(8, 12)
    ht12 = [torch.randn(2, 5, 12, generator=g) for _ in range(2)]
    torch.testing.assert_close(D.hidden_state_loss(hs, ht12, [(0, 1)], proj), F.mse_loss(proj(hs[0]), ht12[1]))
    got.backward()
    assert ht[2].grad is None  # the teacher side is detached
    with pytest.raises(ValueError, match="give proj="):
        D.hidden_state_loss(hs, ht12, {0: 0})
    with pytest.raises(ValueError, match="out of range"):
        D.hidden_state_loss(hs, ht, {3: 0})
    with pytest.raises(TypeError, match="layer_map"):
        D.hidden_state_loss(hs, ht, {})


def test_attention_map_loss_matches_kl_div_rows_and_handles_masked_keys():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    mask = torch.ones(6, dtype=torch.bool)
    mask[4:] = False  # padded keys: weight exactly 0 in both
    a = [torch.softmax(x.masked_fill(~mask, float("-inf")), -1) for x in scores]
    got = D.attention_map_loss(a[:2], a[2:], {0: 1, 1: 0})
    ref = sum(F.kl_div(a[i][..., :4].log().reshape(-1, 4), a[2 + j][..., :4].reshape(-1, 4), reduction="batchmean")
              for i, j in ((0, 1), (1, 0))) / 2
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref)
    assert float(D.attention_map_loss(a, a, {3: 3})) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="differ"):
        D.attention_map_loss([a[0][:, :2]], [a[1]], {0: 0})


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------

def copy_batch(seed=0):
    from effedu.data import make_task

    return make_task("copy", 16, 12, seed=seed)


def test_distill_lowers_the_kd_loss_and_accepts_intermediate_losses():
    teacher = tiny_teacher()
    batch = copy_batch()
    student = D.student_from_teacher(teacher, [0, 3])
    with torch.no_grad():
        before = float(D.kd_loss(student(batch.inputs), teacher(batch.inputs), batch.targets, T=2.0, alpha=0.5))
    hist = D.distill(student, teacher, batch, steps=25, T=2.0, alpha=0.5, lr=1e-2)
    with torch.no_grad():
        after = float(D.kd_loss(student(batch.inputs), teacher(batch.inputs), batch.targets, T=2.0, alpha=0.5))
    assert len(hist["loss"]) == 25 and after < 0.8 * before, (before, after)
    assert not teacher.training and not any(p.grad is not None for p in teacher.parameters())
    s2 = D.student_from_teacher(teacher, [0, 3])
    h2 = D.distill(s2, teacher, batch, steps=3, intermediate={"hidden": {1: 1, 2: 4}, "attention": {1: 3}})
    assert all(math.isfinite(v) for v in h2["loss"])
    with pytest.raises(ValueError, match="same module"):
        D.distill(teacher, teacher, batch, steps=1)
    with pytest.raises(ValueError, match="intermediate"):
        D.distill(s2, teacher, batch, steps=1, intermediate={"logits": {0: 0}})
    with pytest.raises(ValueError, match="alpha"):
        D.distill(s2, teacher, batch, steps=1, alpha=2)


def test_cached_teacher_returns_the_teachers_logits():
    teacher = tiny_teacher()
    batch = copy_batch()
    cached = D.CachedTeacher(teacher, batch.inputs)
    idx = torch.tensor([3, 0, 3, 15])
    with torch.no_grad():
        torch.testing.assert_close(cached(batch.inputs[idx]), teacher(batch.inputs[idx]))
    with pytest.raises(ValueError, match="not in the transfer set"):
        cached(copy_batch(seed=5).inputs[:2])


def test_pooled_embedding_hidden_states_match_the_encoder():
    bert = small_bert()
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    e, hidden = D.pooled_embedding(bert, {"input_ids": ids, "attention_mask": mask}, return_hidden=True)
    assert len(hidden) == 5
    torch.testing.assert_close(hidden[-1], bert(ids, attention_mask=mask))
    torch.testing.assert_close(e, D.pooled_embedding(bert, {"input_ids": ids, "attention_mask": mask}))
    ref = bert(ids, attention_mask=mask)[2, :5].mean(0)  # mean over the real tokens only
    torch.testing.assert_close(e[2], ref)


# ------------------------------------------------------------------------------------------------------------
# the precomputed sweeps
# ------------------------------------------------------------------------------------------------------------

def check_schema(res):
    assert {"command", "quick", "env", "tiny", "minilm"} <= set(res)
    tiny = res["tiny"]
    assert set(tiny["students"]) == {"scratch", "no_kd", "kd"}
    for runs in tiny["students"].values():
        assert len(runs) == len(tiny["seeds"])
        for r in runs:
            assert all(0 <= a <= 1 for a in r["val_acc"]) and len(r["val_acc"]) == len(r["val_step"])
    assert [r["depth"] for r in tiny["depth"]] == sorted(r["depth"] for r in tiny["depth"])
    assert all(r["params"] < tiny["teacher"]["params"] for r in tiny["depth"])
    mini = res["minilm"]
    for r in mini["students"]:
        assert r["params"] < mini["teacher"]["params"] and r["mb"] < mini["teacher"]["mb"]
        for k in ("before", "after"):
            assert 0 < r[k]["cosine"] <= 1 + 1e-9 and 0 <= r[k]["top5"] <= 1
        assert r["time_ratio"] > 0


def test_quick_sweep_writes_a_well_formed_file(tmp_path):
    out = tmp_path / "d.json"
    D.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    check_schema(res)
    assert res["quick"] and res["command"].endswith("--quick")
    # distilling towards the teacher's embeddings, even for two steps, moves the student towards it
    r = res["minilm"]["students"][0]
    assert r["after"]["cosine"] > r["before"]["cosine"]


def test_committed_results_support_the_chapters_claims():
    res = json.loads(D.DEFAULT_OUT.read_text())
    check_schema(res)
    assert not res["quick"] and res["command"] == D.COMMAND
    tiny = res["tiny"]

    def final(kind):
        return sum(r["val_acc"][-1] for r in tiny["students"][kind]) / len(tiny["seeds"])

    assert final("kd") > final("no_kd") > final("scratch")       # what the notebook says
    assert tiny["teacher"]["val_acc"] > final("kd")
    for r in res["minilm"]["students"]:
        assert r["after"]["cosine"] > r["before"]["cosine"] and r["after"]["top5"] >= r["before"]["top5"]


def test_embedding_distill_moves_a_student_towards_the_teachers_embeddings():
    def tokenizer(texts, max_length=None, truncation=False):  # a stand-in: words → ids, padded with 0
        rows = [[1 + (sum(map(ord, w)) % 48) for w in t.split()][:max_length] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    teacher = small_bert()
    teacher.tokenizer = tokenizer
    student = D.student_from_teacher(teacher, [0, 3])
    words = "the a cat dog sat ran on under mat tree red blue big small".split()
    g = torch.Generator().manual_seed(0)
    sentences = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g))
                 for n in torch.randint(3, 8, (64,), generator=g)]
    batch = tokenizer(sentences)
    with torch.no_grad():
        gap0 = float(((D.pooled_embedding(student, batch) - D.pooled_embedding(teacher, batch)) ** 2).mean())
    table = student.tok_emb.weight.detach().clone()
    hist = D.embedding_distill(student, teacher, sentences, steps=30, batch_size=16, lr=3e-3, hidden_map={1: 1, 2: 4})
    with torch.no_grad():
        gap1 = float(((D.pooled_embedding(student, batch) - D.pooled_embedding(teacher, batch)) ** 2).mean())
    assert gap1 < 0.5 * gap0, (gap0, gap1)
    assert len(hist["loss"]) == 30 and torch.equal(student.tok_emb.weight, table)  # word embeddings frozen
    assert student.tok_emb.weight.requires_grad  # ... during the call only
    with pytest.raises(ValueError, match="loss must be"):
        D.embedding_distill(student, teacher, sentences, loss="kl")
    with pytest.raises(ValueError, match="at least batch_size"):
        D.embedding_distill(student, teacher, sentences[:3])
