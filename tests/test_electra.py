"""Chapter 11: ELECTRA's replaced-token detection vs masked LM (effedu.general.electra)."""
import math

import pytest
import torch

from effedu.data import corpus_tokenizer
from effedu.data.corpus import SENTENCE_KINDS, generate_labelled_sentences
from effedu.general import electra as E
from effedu.measure import attention_flops
from effedu.model import IGNORE
from effedu.train import train

V, MASK = 20, 19


def small_config(**kw):
    base = dict(vocab_size=V, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=12, gen_fraction=0.5)
    base.update(kw)
    return E.ElectraConfig(**base)


def tokens(B=4, T=12, seed=0):
    return torch.randint(0, V - 1, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------------------------

def test_mask_statistics_rate_and_80_10_10():
    x = torch.randint(0, V - 1, (400, 250), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    inputs, targets, masked = E.mask_tokens(x, mask_rate=0.15, mask_id=MASK, vocab_size=V, generator=g)
    n = int(masked.sum())
    N = x.numel()
    # the rate: binomial(N, 0.15), 5 standard deviations
    assert abs(n / N - 0.15) < 5 * math.sqrt(0.15 * 0.85 / N)
    is_mask = (inputs == MASK) & masked
    changed = (inputs != x) & ~is_mask & masked
    kept = (inputs == x) & masked
    # random tokens equal to the original (1 in V − 1) look kept: correct the expectation for it
    p_same = 1 / (V - 1)
    for got, p in ((is_mask.sum(), 0.8), (changed.sum(), 0.1 * (1 - p_same)), (kept.sum(), 0.1 + 0.1 * p_same)):
        assert abs(int(got) / n - p) < 5 * math.sqrt(p * (1 - p) / n), (int(got) / n, p)
    # unmasked positions untouched and unscored; masked ones scored with the original
    assert torch.equal(inputs[~masked], x[~masked])
    assert bool((targets[~masked] == IGNORE).all())
    assert torch.equal(targets[masked], x[masked])
    # a random replacement is never [MASK] itself
    assert not bool(((inputs == MASK) & ~is_mask).any())


def test_mask_at_least_one_per_sequence_and_special_never_masked():
    x = tokens(B=64, T=5)
    x[:, 0] = 0  # a special id (say [CLS]) in front of every row
    _, _, masked = E.mask_tokens(x, mask_rate=0.01, mask_id=MASK, vocab_size=V,
                                 generator=torch.Generator().manual_seed(0), special=[0])
    assert bool(masked.any(dim=1).all())
    assert not bool(masked[x == 0].any())


def test_mask_deterministic_under_a_generator_and_split_all_mask():
    x = tokens()
    a = E.mask_tokens(x, mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(5))
    b = E.mask_tokens(x, mask_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    inputs, _, masked = E.mask_tokens(x, mask_rate=0.5, mask_id=MASK, vocab_size=V, split=(1.0, 0.0, 0.0),
                                      generator=torch.Generator().manual_seed(5))
    assert bool((inputs[masked] == MASK).all())


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.1, True, "0.15"])
def test_mask_rate_outside_open_interval_raises(rate):
    with pytest.raises(ValueError, match=r"mask_rate must be a number in \(0, 1\)"):
        E.mask_tokens(tokens(), mask_rate=rate, mask_id=MASK, vocab_size=V)


def test_mask_bad_inputs():
    with pytest.raises(TypeError, match="tokens must be an int64 tensor"):
        E.mask_tokens(tokens().float(), mask_id=MASK, vocab_size=V)
    with pytest.raises(ValueError, match="split must be three fractions"):
        E.mask_tokens(tokens(), mask_id=MASK, vocab_size=V, split=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="not special"):
        E.mask_tokens(torch.zeros(2, 3, dtype=torch.long), mask_id=MASK, vocab_size=V, special=[0])


# ---------------------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------------------

def test_rtd_labels_equal_samples_are_real():
    original = torch.tensor([[1, 2, 3, 4, 5]])
    sampled = torch.tensor([[1, 7, 3, 9, 6]])
    masked = torch.tensor([[True, True, True, False, False]])
    # masked+same → real; masked+different → replaced; unmasked → real whatever "sampled" says there
    assert rtd_list(original, sampled, masked) == [False, True, False, False, False]


def rtd_list(o, s, m):
    return E.rtd_labels(o, s, m)[0].tolist()


def test_rtd_labels_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        E.rtd_labels(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="masked must be a bool"):
        E.rtd_labels(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# the models and the losses
# ---------------------------------------------------------------------------------------------------------------

def test_config_generator_width_and_errors():
    cfg = small_config(d_model=32, n_heads=4, d_ff=64, gen_fraction=0.25)
    g = cfg.generator_config()
    assert (g.d_model, g.n_heads, g.d_ff, g.n_layers, g.causal) == (8, 1, 16, 2, False)
    assert cfg.mask_id == V - 1  # the default: the last id
    with pytest.raises(ValueError, match="lam"):
        small_config(lam=-1.0)
    with pytest.raises(ValueError, match="gen_fraction"):
        small_config(gen_fraction=0)
    with pytest.raises(ValueError, match="mask_rate"):
        small_config(mask_rate=1.0)
    with pytest.raises(ValueError, match="mask_id must be < vocab_size"):
        small_config(mask_id=V)


def test_shared_and_tied_embeddings():
    m = E.Electra(small_config())
    assert m.generator.tok_emb is m.discriminator.tok_emb
    assert m.generator.pos_emb is m.discriminator.pos_emb
    assert m.gen_head.embedding.weight is m.discriminator.tok_emb.weight  # tied output layer
    assert isinstance(m.generator.embed_proj, torch.nn.Linear)  # widths 16 → 8: a projection
    assert isinstance(E.Electra(small_config(gen_fraction=1.0)).generator.embed_proj, torch.nn.Identity)
    # the shared table is counted once
    n_unique = len({id(p) for p in m.parameters()})
    assert n_unique == len(list(m.parameters()))
    b = E.MaskedLM(small_config())
    assert b.head.embedding.weight is b.encoder.tok_emb.weight


def test_discriminator_loss_reaches_the_generator_only_through_shared_embeddings():
    torch.manual_seed(0)
    m = E.Electra(small_config())
    loss, parts = E.electra_loss(m, tokens(), generator=torch.Generator().manual_seed(0))
    assert bool(parts["labels"].any())  # something was replaced: the discriminator has a signal
    own = [p for n, p in m.generator.named_parameters() if not n.startswith(("tok_emb", "pos_emb"))]
    own += [m.gen_head.dense.weight, m.gen_head.dense.bias, m.gen_head.norm.weight, m.gen_head.bias]
    shared = [m.discriminator.tok_emb.weight, m.discriminator.pos_emb.weight]
    g_own = torch.autograd.grad(parts["disc_loss"], own, allow_unused=True, retain_graph=True)
    assert all(g is None or not bool(g.any()) for g in g_own)
    g_shared = torch.autograd.grad(parts["disc_loss"], shared, retain_graph=True)
    assert all(float(g.abs().sum()) > 0 for g in g_shared)
    # and the MLM loss does train the generator's own weights
    g_mlm = torch.autograd.grad(parts["mlm_loss"], [m.generator.blocks[0].ffn.fc1.weight, m.generator.embed_proj.weight])
    assert all(float(g.abs().sum()) > 0 for g in g_mlm)
    # loss = MLM + λ · disc with λ = 50
    torch.testing.assert_close(loss, parts["mlm_loss"] + 50.0 * parts["disc_loss"])


def test_electra_loss_labels_and_disc_loss_formula():
    torch.manual_seed(1)
    m = E.Electra(small_config())
    x = tokens(B=8)
    _, parts = E.electra_loss(m, x, lam=1.0, generator=torch.Generator().manual_seed(3))
    masked, sampled, labels = parts["masked"], parts["sampled"], parts["labels"]
    assert torch.equal(sampled[~masked], x[~masked])
    assert torch.equal(labels, masked & (sampled != x))
    assert not bool((sampled == MASK).any())  # never replaced by [MASK]
    # BCE over all positions, by hand
    p = parts["disc_prob"].double()
    y = labels.double()
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert abs(float(by_hand) - parts["disc"]) < 1e-5


def test_hf_electra_discriminator_loss_is_the_same_bce():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ElectraConfig(vocab_size=V, embedding_size=8, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    hf = transformers.ElectraForPreTraining(cfg).eval()
    x = tokens(B=3, T=10)
    labels = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(input_ids=x, labels=labels)
    # ELECTRA's discriminator loss = mean BCE with logits over every (unpadded) position: what electra_loss uses
    ours = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels.float())
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


def test_losses_bad_input():
    m = E.Electra(small_config())
    with pytest.raises(ValueError, match="lam"):
        E.electra_loss(m, tokens(), lam=-0.5)
    with pytest.raises(ValueError, match="mask_rate"):
        E.electra_loss(m, tokens(), mask_rate=0.0)
    with pytest.raises(TypeError, match="must be an Electra"):
        E.electra_loss(E.MaskedLM(small_config()), tokens())
    with pytest.raises(TypeError, match="must be a MaskedLM"):
        E.mlm_loss(m, tokens())
    with pytest.raises(ValueError, match="token ids must lie"):
        E.electra_loss(m, torch.full((2, 4), V))


def test_mlm_loss_scores_masked_positions_only():
    torch.manual_seed(0)
    b = E.MaskedLM(small_config())
    loss, parts = E.mlm_loss(b, tokens(), generator=torch.Generator().manual_seed(0), return_parts=True)
    assert parts["n_masked"] >= 4  # at least one per sequence
    # N(0, 1) tables tied to the decoder make the untrained MLM confidently wrong: above log V, but finite
    assert 0 < float(loss.detach()) < 4 * math.log(V)
    torch.manual_seed(0)
    b = E.MaskedLM(small_config(init="gpt2"))  # N(0, 0.02): near-uniform predictions at step 0
    assert abs(float(E.mlm_loss(b, tokens(), generator=torch.Generator().manual_seed(0)).detach()) - math.log(V)) < 0.1


@pytest.mark.parametrize("objective", ["electra", "mlm"])
def test_steps_train_with_effedu_train(objective):
    torch.manual_seed(0)
    cfg = small_config()
    model = E.Electra(cfg) if objective == "electra" else E.MaskedLM(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    step = E.electra_step if objective == "electra" else E.mlm_step
    h = train(model, lambda s: (tokens(seed=s), tokens(seed=s)), steps=3, step_fn=step, progress=False)
    assert len(h["loss"]) == 3 and all(math.isfinite(v) for v in h["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# compute
# ---------------------------------------------------------------------------------------------------------------

def body_forward(d, L, d_ff, T, extra=0):
    # 2 × (QKVO + FFN weights per layer + extra matmul weights) × T + L × attention core
    return 2 * (L * (4 * d * d + 2 * d * d_ff) + extra) * T + L * attention_flops(T, d)


def test_pretraining_flops_by_formula():
    cfg = small_config()  # d 16, L 2, d_ff 32, T 12, V 20; generator d 8, d_ff 16
    T, n_tok = 12, 12 * 10
    n_masked = max(1.0, 0.15 * T)
    mlm = E.MaskedLM(cfg)
    # the MLM head (dense d×d, tied decoder d×V) on the masked positions only
    head = 2 * n_masked * (16 * 16 + 16 * V)
    expect = 3 * (body_forward(16, 2, 32, T) + head) * 10
    assert E.pretraining_flops(mlm, n_tok, seq_len=T) == int(expect)
    el = E.Electra(cfg)
    gen = body_forward(8, 2, 16, T, extra=16 * 8)  # + the embedding projection 16 → 8
    heads = 2 * n_masked * (8 * 16 + 16 * V) + 2 * T * (16 * 16 + 16)  # generator head, discriminator head
    expect_el = 3 * (gen + body_forward(16, 2, 32, T) + heads) * 10
    assert abs(E.pretraining_flops(el, n_tok, seq_len=T) - expect_el) <= 2
    assert E.pretraining_flops(el, n_tok, seq_len=T) > E.pretraining_flops(mlm, n_tok, seq_len=T)
    with pytest.raises(ValueError, match="tokens"):
        E.pretraining_flops(el, -1, seq_len=T)
    with pytest.raises(TypeError, match="Electra or a MaskedLM"):
        E.pretraining_flops(torch.nn.Linear(2, 2), 10, seq_len=T)


# ---------------------------------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------------------------------

def test_linear_probe_separable_chance_and_deterministic():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 5, generator=g) + 4 * torch.nn.functional.one_hot(y, 5).float()
    r = E.linear_probe(x, y)
    assert r["test_accuracy"] > 0.95 and r["n_train"] + r["n_test"] == 300
    assert r == E.linear_probe(x, y)
    noise = torch.randn(300, 5, generator=g)
    assert E.linear_probe(noise, y)["test_accuracy"] < 0.5  # chance is 1/3
    with pytest.raises(ValueError, match="labels must be"):
        E.linear_probe(x, y[:10])
    with pytest.raises(ValueError, match="test_fraction"):
        E.linear_probe(x, y, test_fraction=1.0)
    with pytest.raises(ValueError, match="features must be a 2-D"):
        E.linear_probe(x[0], y)


def test_sentence_features_ignore_padding():
    torch.manual_seed(0)
    m = E.Electra(small_config())
    toks = tokens(B=2, T=12)
    lengths = torch.tensor([5, 12])
    both = E.sentence_features(m, toks, lengths)
    alone = E.sentence_features(m, toks[:1, :5], lengths[:1])
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-6)
    assert both.shape == (2, 16)


def test_labelled_sentences_deterministic_alphabet_labels():
    texts, labels, names = generate_labelled_sentences(200, 3)
    assert (texts, labels, names) == generate_labelled_sentences(200, 3)
    assert names == ["present", "past"] and set(labels) == {0, 1}
    assert 60 < sum(labels) < 140
    tok = corpus_tokenizer()
    assert all(c in tok.stoi for t in texts for c in t)
    texts_k, labels_k, names_k = generate_labelled_sentences(400, 0, label="kind")
    assert names_k == list(SENTENCE_KINDS) and set(labels_k) == set(range(8))
    assert all(c in tok.stoi for t in texts_k for c in t)
    q = [t for t, k in zip(texts_k, labels_k) if names_k[k] == "question"]
    assert q and all(t.endswith("?") for t in q)
    with pytest.raises(ValueError, match="label must be one of"):
        generate_labelled_sentences(3, label="topic")


def test_word_tokenizer_covers_the_labelled_sentences():
    tok = E.corpus_tokenizer()
    assert tok.itos[:3] == ["[PAD]", "[UNK]", "[MASK]"] and tok.mask_id == 2
    assert tok.decode_tokens(tok.encode("In 1823, Anna saw a cat.")) == ["In", "1", "8", "2", "3", ",", "Anna", "saw",
                                                                      "a", "cat", "."]
    assert int(tok.encode("a zebra")[1]) == tok.unk_id
    for label in ("tense", "kind"):
        texts, _, _ = generate_labelled_sentences(300, 1, label=label)
        assert all(tok.unk_id not in tok.encode(t).tolist() for t in texts)
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(3)


def test_pretrain_records_probe_points_and_flops():
    tok = E.corpus_tokenizer()
    cfg = small_config(vocab_size=tok.vocab_size, mask_id=tok.mask_id, max_len=16)
    train_ids = tok.encode("The cat sees the dog. The dogs saw a cat. " * 20)
    probe = E.probe_data(40, max_len=16, tokenizer=tok)
    _, rec = E.pretrain("electra", cfg, steps=4, batch_size=4, probe=probe[:3], probe_every=2, train_ids=train_ids)
    assert rec["probe_steps"] == [0, 2, 4]
    assert rec["probe_flops"] == [0, 2 * rec["flops_per_step"], 4 * rec["flops_per_step"]]
    assert all(0 <= a <= 1 for a in rec["probe_accuracy"]) and len(rec["loss"]) == 4
    with pytest.raises(ValueError, match="objective"):
        E.pretrain("bert", cfg, steps=1)


# ---------------------------------------------------------------------------------------------------------------
# why the discriminator learns: a width-scaled initialisation, and the AUC that shows it
# ---------------------------------------------------------------------------------------------------------------


def test_rtd_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (7, 9), generator=g).float()  # many ties
    y = torch.rand(7, 9, generator=g) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert E.rtd_auc(s, y) == pytest.approx(float(brute), abs=1e-12)
    assert E.rtd_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert E.rtd_auc(torch.tensor([0.9, 0.1]), torch.tensor([False, True])) == 0.0
    assert math.isnan(E.rtd_auc(torch.ones(3), torch.zeros(3, dtype=torch.bool)))


def _attention_spread(model, seed=0):
    """Mean absolute deviation of the first layer's attention weights from uniform (0 = uniform)."""
    x = tokens(8, 12, seed)
    with torch.no_grad():
        _, att = model.discriminator(x, return_attentions=True)
    return float((att[0] - 1 / x.shape[1]).abs().mean())


def test_width_scaled_init_scales_and_makes_attention_non_uniform():
    cfg = dict(vocab_size=V, d_model=64, n_heads=4, n_layers=2, d_ff=256, max_len=12, gen_fraction=0.25)
    torch.manual_seed(0)
    wide = E.Electra(E.ElectraConfig(**cfg))  # init="width" is the default
    torch.manual_seed(0)
    gpt2 = E.Electra(E.ElectraConfig(**cfg, init="gpt2"))
    w = wide.discriminator.blocks[0].attn.qkv.weight.detach()
    assert abs(float(w.std()) - 64 ** -0.5) < 0.01 and float(w.std()) > 5 * 0.02
    assert abs(float(wide.discriminator.tok_emb.weight.detach().std()) - 1) < 0.05
    assert abs(float(gpt2.discriminator.tok_emb.weight.detach().std()) - 0.02) < 0.002
    assert float(wide.disc_head[0].bias.detach().abs().max()) == 0  # biases zero
    # ties survive the re-initialisation
    assert wide.gen_head.embedding.weight is wide.discriminator.tok_emb.weight
    # the cause of the plateau: with N(0, 0.02) at d = 64 attention starts (and stays) uniform
    flat, sharp = _attention_spread(gpt2), _attention_spread(wide)
    assert flat < 0.005 and sharp > 0.02 and sharp > 10 * flat, (flat, sharp)
    torch.manual_seed(0)
    mlm = E.MaskedLM(E.ElectraConfig(**cfg))
    # one seed → the same encoder for ELECTRA's discriminator and the MLM baseline (the probe's step 0 agrees)
    assert all(torch.equal(a, b) for a, b in zip(wide.discriminator.state_dict().values(),
                                                 mlm.encoder.state_dict().values()))
    assert abs(float(mlm.encoder.blocks[0].ffn.fc2.weight.detach().std()) - 256 ** -0.5) < 0.01
    with pytest.raises(ValueError, match="init must be 'width' or 'gpt2'"):
        E.ElectraConfig(**cfg, init="xavier")


def test_electra_loss_reports_base_rate_and_auc():
    torch.manual_seed(0)
    m = E.Electra(small_config())
    x = tokens(6, 12)
    _, parts = E.electra_loss(m, x, generator=torch.Generator().manual_seed(0))
    lab = parts["labels"]
    assert parts["disc_base_rate"] == pytest.approx(1 - float(lab.float().mean()))
    assert parts["disc_auc"] == pytest.approx(E.rtd_auc(parts["disc_prob"], lab))
