"""The course's syllabus as data: per chapter its title, survey section, learning objectives, prerequisites and
run time, plus a 12-week course plan and a 2-day workshop plan.

The run time is never typed in: :func:`notebook_runtime` reads it from the committed notebook's cell execution
timestamps (JupyterLab / nbclient record ``iopub.status.busy`` and ``iopub.status.idle`` for every code cell), from
the first code cell's start to the last code cell's end — the time the notebook took when it was executed for the
repository, on 2 CPU cores. A notebook that is missing (or was never executed) has no run time (``None``, shown "—").

    from effedu import syllabus
    syllabus.CHAPTERS[15]["objectives"]
    print(syllabus.syllabus_markdown())      # the syllabus page of the static site (``python -m effedu.site``)
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# number, stem, title, survey section, objectives, prerequisites (chapter numbers)
_TABLE = [
    (0, "00_setup", "Setup, and the meters every chapter uses", "–", [
        "measure the activation memory autograd keeps for a backward pass, and check it by hand",
        "read a memory timeline of one training step and explain why it is a mountain",
        "explain why timings are medians after a warm-up, and measure how much they vary",
        "list which kernel backends (torch, numba, numba.cuda) are live on your machine",
    ], []),
    (1, "01_transformer", "The Transformer, from scratch, and what it costs", "§2", [
        "implement scaled dot-product and multi-head attention from tensor ops and check them against PyTorch's",
        "measure time and memory of attention against the sequence length n and fit the n² law",
        "measure the FLOP share of attention vs the feed-forward network as n and d vary",
        "explain why pre-LN stacks have better-behaved gradients than post-LN ones at initialisation",
    ], [0]),
    (2, "02_gradient_checkpointing", "Gradient checkpointing: trade compute for memory", "§3.1", [
        "implement checkpoint(fn, *args) as a custom autograd.Function and check it against torch.utils.checkpoint",
        "measure activation bytes against depth for every-k and √L segment plans and fit the exponents",
        "measure the extra time that recomputation costs",
    ], [1]),
    (3, "03_reversible_layers", "Reversible layers: activations you do not have to store", "§3.2", [
        "implement the additive coupling and its exact inverse, and a backward pass that rebuilds activations",
        "measure activation memory flat in depth for the reversible stack, linear for the plain one",
        "measure the reconstruction error against depth in float64, float32 and bfloat16",
    ], [1, 2]),
    (4, "04_parameter_sharing", "Parameter sharing: ALBERT, shared-QK, shared projections", "§3.3", [
        "implement cross-layer sharing as real tying (one parameter, gradients summed)",
        "compute the parameter savings of ALBERT's factorised embedding",
        "explain why sharing saves parameters but neither compute nor activation memory, and measure it",
    ], [1]),
    (5, "05_pruning", "Pruning: magnitude, heads, layers, lottery tickets", "§3.4", [
        "implement magnitude pruning (per matrix and global) and check it against torch.nn.utils.prune",
        "measure accuracy against the pruned fraction for unstructured, head and layer pruning",
        "measure when a sparse matrix product (CSR kernel, torch.sparse) beats dense sgemm on your CPU",
    ], [1]),
    (6, "06_distillation", "Knowledge distillation: a small student taught by a large teacher", "§3.5", [
        "implement Hinton's distillation loss with temperature T and explain the T² factor",
        "train a 2-layer student of a 6-layer teacher and measure its accuracy with and without distillation",
        "measure a distilled MiniLM student's fidelity, size and speed",
    ], [1]),
    (7, "07_mixed_precision", "Mixed precision: compute in 16 bits, remember small steps in 32", "§3.6", [
        "explain what float16 and bfloat16 can and cannot represent (range, subnormals, spacing above 1)",
        "implement float32 master weights and static and dynamic loss scaling",
        "measure gradient underflow with histograms, with and without loss scaling",
    ], [1]),
    (8, "08_quantization", "Quantization: int8, PTQ, QAT, iPQ and Quant-Noise", "§3.6", [
        "implement affine and symmetric quantisation, per tensor and per channel",
        "measure error and accuracy against the number of bits for post-training and quantisation-aware training",
        "measure whether int8 inference is faster than float32 on your CPU",
    ], [1, 7]),
    (9, "09_micro_batching", "Micro-batching and pipeline parallelism (GPipe)", "§3.7", [
        "implement gradient accumulation that equals the full-batch gradient exactly",
        "count the GPipe bubble (K−1)/(M+K−1) in the schedule",
        "run a real 2-process pipeline (gloo) and measure memory per stage",
    ], [1, 2]),
    (10, "10_mixture_of_experts", "Mixture of experts: more parameters, not more FLOPs", "§3.8", [
        "implement top-k and Switch top-1 routing with capacity and token dropping",
        "measure expert load with and without the load-balancing loss (router collapse)",
        "compare a tiny MoE language model with a dense one at equal FLOPs",
    ], [1]),
    (11, "11_electra", "A sample-efficient objective: ELECTRA's replaced-token detection", "§3.9", [
        "implement BERT masking (15 %, 80/10/10) and check its statistics",
        "implement replaced-token detection with a small generator and a discriminator",
        "measure linear-probe quality against pre-training FLOPs for MLM and ELECTRA at equal compute",
    ], [1]),
    (12, "12_initialization", "Initialisation: training deep Transformers without warm-up", "§3.10", [
        "measure per-layer gradient norms of Post-LN and Pre-LN at initialisation",
        "implement T-Fixup and Admin initialisation",
        "show a 12-layer Post-LN that stalls without warm-up where Pre-LN, T-Fixup and Admin train",
    ], [1]),
    (13, "13_architecture_search", "Architecture search: evolution and progressive dynamic hurdles", "§3.11", [
        "implement evolution with tournament selection over effedu's Transformer",
        "count the training steps saved by progressive dynamic hurdles, against the quality found",
        "measure a Pareto front of loss against parameters and against latency on your CPU",
    ], [1]),
    (14, "14_conditional_computing", "Conditional computation: early exit, ACT, per-token depth", "§3.12", [
        "implement DeeBERT entropy and PABEE patience early exit on a classifier after every layer",
        "implement adaptive computation time (halting, remainder, ponder cost)",
        "measure compute (layers run) against accuracy on easy and hard inputs",
    ], [1, 10]),
    (15, "15_sparse_attention", "Sparse attention: fixed patterns, and the kernel that makes them pay", "§4.1", [
        "implement local, strided, Longformer and BigBird patterns as token masks and as block layouts",
        "measure the receptive field of a pattern over layers",
        "measure block-sparse kernel against masked-dense attention (the hardware lottery)",
    ], [1]),
    (16, "16_learned_sparse_attention", "Learned sparse attention: LSH, routing, Sinkhorn, α-entmax", "§4.1", [
        "measure LSH collision probability against angle and compare it with 1 − θ/π",
        "implement Reformer's sort → chunk → attend and measure its error against the number of rounds",
        "measure time and memory against n for LSH, block-sparse and dense attention (the crossover)",
    ], [1, 15]),
    (17, "17_low_rank_attention", "Low-rank attention: Linformer, Nyströmformer, Synthesizer", "§4.2", [
        "measure the singular-value spectrum of real attention maps: is attention approximately low rank?",
        "implement Linformer and Nyströmformer and compare their error with the SVD bound",
        "explain why Linformer cannot be causal",
    ], [1]),
    (18, "18_kernel_attention", "Kernel attention: linear Transformers, Performers, clustering", "§4.2", [
        "implement linear attention, causal via prefix sums and as an RNN, against the naive O(n²) computation",
        "measure the Performer estimator's error with iid and orthogonal features",
        "measure the crossover n where linear attention beats softmax, and the flat decode time per token",
    ], [1]),
    (19, "19_memory_efficient_attention", "Memory-efficient exact attention: tiles and the online softmax",
     "exact tiled attention", [
        "implement the online softmax and a backward pass by recomputation from the log-sum-exp",
        "measure O(n) against O(n²) peak memory",
        "explain the IO model against block size and causal tile skipping",
    ], [1]),
    (20, "20_architectural_changes", "Architectural change: Transformer-XL, Compressive, Funnel, Perceiver", "§4.3", [
        "implement Transformer-XL segment recurrence and measure its reach L·M exactly",
        "measure accuracy against memory length on a needle task",
        "count the FLOPs of Funnel pooling and Perceiver latents exactly (linear in n)",
    ], [1]),
    (21, "21_capstone", "Capstone: a mini Long-Range Arena, the trade-off explorer and the decision guide", "§5", [
        "measure every attention of the course on a mini Long-Range Arena (accuracy, speed, memory) on your machine",
        "combine techniques (checkpointing, precision, int8, attention) on one model under a memory or time budget",
        "compare your machine's results with Tay et al.'s LRA Tables 1–2",
        "explain which technique to choose for a given constraint, with measured evidence",
    ], [1, 2, 7, 8, 15, 16, 17, 18, 19]),
]


def _parse_time(stamp):
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def notebook_runtime(path) -> float | None:
    """Seconds from the first code cell's ``iopub.status.busy`` to the last code cell's ``iopub.status.idle``
    (the execution timestamps JupyterLab / nbclient store in ``cell.metadata.execution``); None when the notebook
    does not exist or carries no such timestamps."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"notebook_runtime: path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        return None
    nb = json.loads(p.read_text(encoding="utf-8"))
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    starts = [_parse_time(c.get("metadata", {}).get("execution", {}).get("iopub.status.busy")) for c in code]
    ends = [_parse_time(c.get("metadata", {}).get("execution", {}).get("iopub.status.idle")) for c in code]
    starts = [s for s in starts if s is not None]
    ends = [e for e in ends if e is not None]
    if not starts or not ends:
        return None
    seconds = (max(ends) - min(starts)).total_seconds()
    return seconds if seconds >= 0 else None


def _chapters(notebooks_dir=None):
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS
    out = []
    for number, stem, title, section, objectives, prereq in _TABLE:
        path = nb_dir / f"{stem}.ipynb"
        out.append({"number": number, "stem": stem, "title": title, "survey": section,
                    "objectives": list(objectives), "prerequisites": list(prereq),
                    "notebook": f"notebooks/{stem}.ipynb", "runtime_s": notebook_runtime(path)})
    return out


CHAPTERS = _chapters()  # run times read once, at import, from the committed notebooks

# week -> chapters + the lab/assignment of that week
PLAN_12_WEEKS = [
    {"week": 1, "chapters": [0, 1], "lab": "Run the meters on your machine; fit the n² law of attention."},
    {"week": 2, "chapters": [2, 3], "lab": "Activation memory vs depth: checkpointing plans against a reversible stack."},
    {"week": 3, "chapters": [4, 5], "lab": "Assignment: at what sparsity does the CSR kernel beat dense on your CPU?"},
    {"week": 4, "chapters": [6, 7], "lab": "Distil a 2-layer student; train it in bf16 with dynamic loss scaling."},
    {"week": 5, "chapters": [8, 9], "lab": "PTQ vs QAT at 4 and 8 bits; the GPipe bubble counted and measured."},
    {"week": 6, "chapters": [10, 11], "lab": "MoE vs dense at equal FLOPs; ELECTRA vs MLM at equal compute."},
    {"week": 7, "chapters": [12, 13, 14], "lab": "Midterm assignment: a Pareto front (loss vs latency) on your CPU."},
    {"week": 8, "chapters": [15], "lab": "Block-sparse kernel vs masked-dense: find the crossover n."},
    {"week": 9, "chapters": [16, 17], "lab": "LSH error vs rounds; is attention really low rank? (spectra)"},
    {"week": 10, "chapters": [18, 19], "lab": "Linear vs softmax vs tiled exact attention: time and peak memory vs n."},
    {"week": 11, "chapters": [20], "lab": "Transformer-XL memory length vs accuracy on the needle task."},
    {"week": 12, "chapters": [21], "lab": "Final project: the mini-LRA on your machine and a decision for your constraint."},
]

# day -> morning/afternoon blocks (a workshop runs every chapter once, the starred ones hands-on)
PLAN_2_DAYS = [
    {"day": 1, "block": "morning", "chapters": [0, 1, 2, 3, 4],
     "focus": "The meters and the Transformer's cost; memory: checkpointing, reversible layers, sharing."},
    {"day": 1, "block": "afternoon", "chapters": [5, 6, 7, 8, 9, 10],
     "focus": "Smaller and cheaper models: pruning, distillation, precision, int8, pipelines, experts."},
    {"day": 2, "block": "morning", "chapters": [11, 12, 13, 14, 15, 16],
     "focus": "Training recipes (ELECTRA, initialisation, search, early exit); sparse attention, fixed and learned."},
    {"day": 2, "block": "afternoon", "chapters": [17, 18, 19, 20, 21],
     "focus": "Low-rank, kernel, tiled exact attention, architectural change; the capstone and the decision guide."},
]


def format_runtime(seconds) -> str:
    """``"42 s"``, ``"1 min 05 s"`` or ``"—"`` (no run time)."""
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _title(number):
    ch = CHAPTERS[number]
    return f"{ch['number']:02d} {ch['title']}"


def _link(number, link_style):
    ch = CHAPTERS[number]
    if link_style == "site":
        return f"[{ch['number']:02d}]({ch['stem']}.html)"
    if link_style == "repo":
        return f"[{ch['number']:02d}]({ch['notebook']})"
    return f"{ch['number']:02d}"


def syllabus_markdown(link_style="site", plans=True) -> str:
    """The syllabus as markdown: one section per chapter (objectives, survey section, prerequisites, run time on
    2 cores), then the 12-week and 2-day plans (``plans=False`` leaves them out). ``link_style``: ``"site"``
    (links to ``NN_stem.html``), ``"repo"`` (to ``notebooks/NN_stem.ipynb``) or ``None`` (no links)."""
    if link_style not in ("site", "repo", None):
        raise ValueError(f"syllabus_markdown: link_style must be 'site', 'repo' or None, got {link_style!r}")
    lines = ["## Chapters", "",
             "Run times are those of the committed notebooks, read from their execution timestamps "
             "(2 CPU cores); — where a notebook has not been executed yet.", ""]
    for ch in CHAPTERS:
        head = f"{ch['number']:02d} — {ch['title']}"
        lines.append(f"### {head}")
        lines.append("")
        where = (f"[{ch['stem']}]({ch['stem']}.html)" if link_style == "site"
                 else f"[{ch['stem']}]({ch['notebook']})" if link_style == "repo" else ch["stem"])
        pre = ", ".join(_link(n, link_style) for n in ch["prerequisites"]) or "none"
        lines += [f"- **notebook:** {where}", f"- **survey section:** {ch['survey']}",
                  f"- **prerequisites:** {pre}", f"- **run time on 2 cores:** {format_runtime(ch['runtime_s'])}",
                  "- **learning objectives:**"]
        lines += [f"  - {o}" for o in ch["objectives"]]
        lines.append("")
    if plans:
        lines += ["## A 12-week course", "", "| week | chapters | lab / assignment |", "|---|---|---|"]
        for w in PLAN_12_WEEKS:
            chs = ", ".join(_link(n, link_style) for n in w["chapters"])
            lines.append(f"| {w['week']} | {chs} | {w['lab']} |")
        lines += ["", "## A 2-day workshop", "", "| day | block | chapters | focus |", "|---|---|---|---|"]
        for b in PLAN_2_DAYS:
            chs = ", ".join(_link(n, link_style) for n in b["chapters"])
            lines.append(f"| {b['day']} | {b['block']} | {chs} | {b['focus']} |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["CHAPTERS", "PLAN_12_WEEKS", "PLAN_2_DAYS", "notebook_runtime", "format_runtime", "syllabus_markdown"]
