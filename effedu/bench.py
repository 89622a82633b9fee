"""``python -m effedu.bench [name ...]``: the tables behind every speed and memory claim of the course.

Each benchmark measures effedu's implementation *and torch's* in the same run and prints ratios, so the numbers
say something on any machine. Tests never assert times; the closing notes and notebooks quote these tables.

A chapter adds a benchmark by defining ``BENCHMARKS = {"name": fn}`` in its own module under
``effedu/general`` or ``effedu/attention`` (or ``effedu/kernels``); ``fn(args) -> str`` returns the table. They
are found by scanning those packages: nothing to register here.
"""
from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import sys


def _fmt_ms(t):
    return "—" if t is None else f"{t * 1e3:8.1f}"


def _fmt_ratio(t, ref):
    return "—" if (t is None or ref is None) else f"{t / ref:5.2f}×"


def _fmt_mib(b):
    return "—" if b is None else f"{b / 2**20:9.1f}"


def bench_attention(args):
    """Exact attention: torch SDPA vs effedu's torch reference, naive (materialised) and numba tiled."""
    import numba
    import torch
    import torch.nn.functional as F

    from . import kernels
    from .attention.dense import softmax_attention
    from .kernels.tiled_attention import numba_workspace_bytes
    from .measure import peak_memory, time_it

    threads = args.threads
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    B, H, D = 1, 8, 64
    ns = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    lean_only = {8192}  # the materialised path needs ~6 GiB there: time is not measured for it
    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    paths = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "torch-ref": lambda q, k, v: kernels.attention(q, k, v, backend="torch"),
        "naive": lambda q, k, v: softmax_attention(q, k, v),
        "numba": lambda q, k, v: kernels.attention(q, k, v, backend="numba"),
    }
    header = (f"{'n':>6} | {'SDPA ms':>8} | {'torch-ref ms':>12} {'':>6} | {'naive ms':>8} {'':>6} | "
              f"{'numba ms':>8} {'':>6} || peak extra MiB: {'SDPA':>9} {'torch-ref':>9} {'naive':>9} {'numba':>9}")
    lines = [f"attention forward, B={B} H={H} D={D} float32, {threads} threads (torch + numba); "
             f"ratios = time / SDPA time in the same run",
             header, "-" * len(header)]
    rows = {}
    with torch.no_grad():
        for n in ns:
            q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=dtype) for _ in range(3))
            t, mem = {}, {}
            for name, fn in paths.items():
                if name == "naive" and n in lean_only and not args.naive_8192:
                    # extra memory of the materialised path, from its measured cost per score at n=4096
                    prev = rows.get(4096)
                    mem[name] = None if prev is None or prev[1]["naive"] is None else prev[1]["naive"] * (n / 4096) ** 2
                    t[name] = None
                    continue
                repeat = 3 if n >= 4096 else 7
                t[name] = time_it(fn, q, k, v, warmup=1, repeat=repeat)
                mem[name], _ = peak_memory(fn, q, k, v)
            mem["numba"] += numba_workspace_bytes(n, n, D, D, itemsize=4)
            rows[n] = (t, mem)
            est = " (extrapolated n²)" if (n in lean_only and t["naive"] is None and mem["naive"]) else ""
            lines.append(
                f"{n:>6} | {_fmt_ms(t['sdpa'])} | {_fmt_ms(t['torch-ref']):>12} {_fmt_ratio(t['torch-ref'], t['sdpa']):>6} | "
                f"{_fmt_ms(t['naive'])} {_fmt_ratio(t['naive'], t['sdpa']):>6} | {_fmt_ms(t['numba'])} "
                f"{_fmt_ratio(t['numba'], t['sdpa']):>6} || {'':>15} {_fmt_mib(mem['sdpa'])} {_fmt_mib(mem['torch-ref'])} "
                f"{_fmt_mib(mem['naive'])} {_fmt_mib(mem['numba'])}{est}"
            )
            sys.stdout.flush()
    lines.append("")
    if 2048 in rows:
        t, _ = rows[2048]
        lines.append(f"target: numba tiled ≤ 1.5× SDPA at n=2048 → {t['numba'] / t['sdpa']:.2f}×")
    if 8192 in rows:
        _, mem = rows[8192]
        if mem["naive"]:
            lines.append(f"target: numba extra memory at n=8192 ≥ 50× below the materialised path → "
                         f"{mem['naive'] / mem['numba']:.0f}× below")
    lines.append("peak extra = torch allocations seen by the profiler during the call (+ the numba kernel's own "
                 "workspace, computed from its allocations: numba_workspace_bytes)")
    lines += ["", _bench_attention_backward(args, ns)]
    for sub in ATTENTION_CHAPTERS:
        fn = discover().get(sub)
        if fn is not None:
            lines += ["", f"-- {sub} (chapter benchmark, also runnable alone: python -m effedu.bench {sub}) --", fn(args)]
    return "\n".join(lines)


def _bench_attention_backward(args, ns):
    """Forward + backward of exact attention: SDPA vs the materialised path vs effedu's numba tiled kernels."""
    import torch
    import torch.nn.functional as F

    from . import kernels
    from .attention.dense import softmax_attention
    from .attention.memory_efficient import fwd_bwd
    from .kernels.tiled_attention import numba_workspace_bytes
    from .measure import peak_memory, time_it

    B, H, D = 1, 8, 64
    gen = torch.Generator().manual_seed(1)
    lines = [f"attention forward+backward (grads of q, k, v), B={B} H={H} D={D} float32, {args.threads} threads; "
             "ratios = time / SDPA's forward+backward in the same run",
             f"{'n':>6} {'causal':>6} | {'SDPA ms':>8} | {'naive ms':>8} {'':>6} | {'numba ms':>8} {'':>6} || "
             f"peak extra MiB: {'SDPA':>8} {'naive':>8} {'numba':>8}"]
    lines.append("-" * len(lines[-1]))
    ratio_2048 = {}
    for n in ns:
        for causal in (False, True):
            q, k, v, dout = (torch.randn(B, H, n, D, generator=gen) for _ in range(4))
            paths = {
                "sdpa": lambda a, b, c, _c=causal: F.scaled_dot_product_attention(a, b, c, is_causal=_c),
                "naive": lambda a, b, c, _c=causal: softmax_attention(a, b, c, causal=_c),
                "numba": lambda a, b, c, _c=causal: kernels.attention(a, b, c, causal=_c, backend="numba"),
            }
            t, mem = {}, {}
            for name, fn in paths.items():
                if name == "naive" and n > 2048:  # 3 n×n float32 matrices per head kept for backward: GiBs
                    t[name] = mem[name] = None
                    continue
                t[name] = time_it(fwd_bwd, fn, q, k, v, dout, warmup=1, repeat=3 if n >= 4096 else 5)
                mem[name], _ = peak_memory(fwd_bwd, fn, q, k, v, dout)
            mem["numba"] += numba_workspace_bytes(n, n, D, D, itemsize=4, backward=True)
            if n == 2048:
                ratio_2048[causal] = t["numba"] / t["sdpa"]
            lines.append(f"{n:>6} {str(causal):>6} | {_fmt_ms(t['sdpa'])} | {_fmt_ms(t['naive'])} "
                         f"{_fmt_ratio(t['naive'], t['sdpa']):>6} | {_fmt_ms(t['numba'])} "
                         f"{_fmt_ratio(t['numba'], t['sdpa']):>6} || {'':>15} {_fmt_mib(mem['sdpa']):>8} "
                         f"{_fmt_mib(mem['naive']):>8} {_fmt_mib(mem['numba']):>8}")
            sys.stdout.flush()
    if ratio_2048:
        lines += ["", "target: tiled exact attention forward+backward ≤ 2× SDPA's at n=2048 → "
                  + ", ".join(f"{'causal' if c else 'full'} {r:.2f}×" for c, r in ratio_2048.items())]
    lines.append("naive forward+backward is not run above n=2048 (it keeps three n×n matrices per head)")
    return "\n".join(lines)


# chapter benchmarks that `attention` runs after its own tables (each is also runnable alone)
ATTENTION_CHAPTERS = ("sparse", "lowrank", "kernelized")


def bench_memory(args):
    """The memory-saving training techniques side by side on one model: activation bytes, parameters, step time."""
    import torch

    from .general.checkpoint import checkpoint_model, predicted_activation_bytes, segment_plan
    from .general.precision import MixedPrecisionModel
    from .general.reversible import ReversibleTransformer
    from .general.sharing import share_layers
    from .measure import count_parameters, saved_activation_bytes, time_it
    from .model import Transformer, TransformerConfig
    from .train import lm_loss

    torch.set_num_threads(args.threads)
    L, d, T, B, V = (4, 128, 128, 4, 67) if args.quick else (12, 256, 512, 8, 67)
    cfg = TransformerConfig(vocab_size=V, d_model=d, n_heads=4, n_layers=L, d_ff=4 * d, max_len=T)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)

    def fresh(config=cfg):
        torch.manual_seed(0)
        return Transformer(config)

    base_model = fresh()
    variants = {
        "plain": base_model,
        "checkpoint every layer": checkpoint_model(base_model, "every"),
        "checkpoint √L segments": checkpoint_model(base_model, "sqrt"),
        "reversible": (torch.manual_seed(0), ReversibleTransformer(cfg))[1],
        "bf16 compute + fp32 masters": MixedPrecisionModel(fresh(), torch.bfloat16),
        "ALBERT all-shared": share_layers(fresh(), "all"),
    }

    def step(model):
        model.zero_grad(set_to_none=True)
        lm_loss(model(tokens), targets).backward()

    rows = {}
    for name, model in variants.items():
        saved = saved_activation_bytes(model, tokens)
        t = time_it(step, model, warmup=1, repeat=3)
        rows[name] = (saved, count_parameters(model), t)
    plain_saved, _, plain_t = rows["plain"]
    lines = [f"training step, {L} layers, d={d}, T={T}, B={B}, float32 unless stated, {args.threads} threads",
             f"{'variant':30s} {'saved act. MiB':>15s} {'vs plain':>9s} {'parameters':>12s} {'step s':>8s} {'vs plain':>9s}"]
    for name, (saved, n_params, t) in rows.items():
        lines.append(f"{name:30s} {saved / 2**20:15.1f} {saved / plain_saved:8.1%} {n_params:12,d} {t:8.2f} "
                     f"{t / plain_t:8.2f}×")
    # targets of issue 3
    one, two = (saved_activation_bytes(fresh(cfg.replace(n_layers=n)), tokens) for n in (1, 2))
    a = two - one  # one layer, run plainly
    c = B * T * d * 4  # one checkpoint: a layer's input
    predicted = predicted_activation_bytes(segment_plan(L, "sqrt"), a, c, one - a)
    measured = rows["checkpoint √L segments"][0]
    rev2 = saved_activation_bytes((torch.manual_seed(0), ReversibleTransformer(cfg.replace(n_layers=2)))[1], tokens)
    lines += ["",
              f"target: √L checkpointing within 5% of the √L memory model → {measured / predicted - 1:+.1%}",
              f"target: reversible {L} layers within 10% of 2 layers → {rows['reversible'][0] / rev2 - 1:+.1%}",
              f"target: checkpointing time overhead ≤ 1.5× → every layer {rows['checkpoint every layer'][2] / plain_t:.2f}×, "
              f"√L {rows['checkpoint √L segments'][2] / plain_t:.2f}×",
              "saved act. = bytes saved for backward during the forward (measure.saved_activation_bytes); checkpointed "
              "variants recompute a segment at a time in backward (see chapter 02 for the peak)"]
    return "\n".join(lines)


def bench_pretrained(args):
    """MiniLM-L6 (pretrained) forward: effedu vs transformers, and every attention variant with its fidelity."""
    from .pretrained import bench_pretrained as run

    return run(args)


BUILTIN = {"attention": bench_attention, "memory": bench_memory, "pretrained": bench_pretrained}


def discover():
    """Every benchmark: the built-in ones plus ``BENCHMARKS`` dicts found in effedu's technique modules."""
    found = dict(BUILTIN)
    for pkg_name in ("effedu.general", "effedu.attention", "effedu.kernels"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{pkg_name}.{info.name}")
            for name, fn in getattr(mod, "BENCHMARKS", {}).items():
                found.setdefault(name, fn)
    return found


def main(argv=None):
    benches = discover()
    parser = argparse.ArgumentParser(prog="python -m effedu.bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(sorted(benches))}")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and numba (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--naive-8192", action="store_true",
                        help="also run the materialised path at n=8192 (needs ~6 GiB)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in sorted(benches):
            print(f"{name}: {(benches[name].__doc__ or '').strip().splitlines()[0] if benches[name].__doc__ else ''}")
        return 0
    unknown = [n for n in args.names if n not in benches]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(sorted(benches))}")
    if args.threads < 1:
        parser.error("--threads must be ≥ 1")
    import effedu

    effedu.env_report()
    print()
    # `attention` already includes the attention chapters' tables: running everything should not repeat them
    default = [n for n in sorted(benches) if n not in ATTENTION_CHAPTERS or "attention" not in benches]
    for name in args.names or default:
        print(f"== {name} ==")
        print(benches[name](args))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
