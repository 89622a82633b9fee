"""``python -m effedu.bench moe`` (chapter 10): moving tokens to experts and back, and what expert parallelism costs.

Table 1, the data movement alone (identity experts) at 4096 tokens, d = 256, 8 experts, top-1, capacity factor
1.25 (C = 640), float32: dispatch + combine with effedu's numba kernel, its torch reference, Mesh-TensorFlow's one-hot
einsum (the (N, E, C) dispatch tensor) and a per-expert Python loop — forward, and forward + backward; seconds and
ratios to numba. Target (issue 13): numba ≥ 3× faster than the einsum and faster than the loop.
Table 2, the whole layer: ``MoEFeedForward(256, 1024, 8)`` forward + backward with each dispatch mode, and a dense
FFN of the same FLOPs per token (top-1: one expert's FFN per token).
Table 3, the same layer expert-parallel over 2 processes (gloo, loopback; ``effedu.general.expert_parallel``): one
step's time split into compute and all-to-all (and the router's all-reduce) per rank, the max over ranks.
"""
from __future__ import annotations

import importlib
import statistics

from .. import measure
from ._format import Column, Table
from ._progress import steps

METHODS = ("numba", "torch", "einsum", "loop")
LABELS = {"numba": "effedu kernel, numba", "torch": "effedu kernel, torch reference",
          "einsum": "one-hot einsum (Mesh-TF/GShard)", "loop": "per-expert Python loop"}
LAYER_MODES = ("kernel-numba", "kernel-torch", "einsum", "loop", "dense")
LAYER_LABELS = {"kernel-numba": "MoE, dispatch='kernel' (numba)", "kernel-torch": "MoE, dispatch='kernel' (torch)",
                "einsum": "MoE, dispatch='einsum'", "loop": "MoE, dispatch='loop'",
                "dense": "dense FFN, same FLOPs/token"}
EP_PARTS = ("compute", "all_to_all", "all_reduce", "total")


def _ms(key, header, width=9, sep=" "):
    return Column(key, header, width, ".2f", 1e3, sep=sep)


def _ratio(key, header="", width=7, sep=" "):
    return Column(key, header, width, ".2f", suffix="×", sep=sep)


def sizes(quick):
    """Benchmark sizes: tokens N, width d, FFN width d_ff, experts E, top-k, capacity factor, repeats."""
    if quick:
        return dict(n_tokens=512, d=64, d_ff=128, n_experts=4, k=1, capacity_factor=1.25, repeat=2)
    return dict(n_tokens=4096, d=256, d_ff=1024, n_experts=8, k=1, capacity_factor=1.25, repeat=7)


def routing(n_tokens, n_experts, k, capacity_factor, seed=0):
    """A top-k routing of random router logits (``top_k_route``, GShard's slots): ``(expert_index, slot, gate, C)``."""
    import torch

    from ..general.moe import capacity_for, top_k_route

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tokens, n_experts, generator=g)
    capacity = capacity_for(n_tokens, n_experts, k, capacity_factor)
    expert_index, gate, _, slot = top_k_route(logits, k, capacity, return_slots=True)
    return expert_index, slot, gate, capacity


def movement_fns(x, expert_index, slot, gate, n_experts, capacity, methods=METHODS):
    """``{method: (forward, forward_backward)}``: dispatch → identity experts → combine, and that plus backward."""
    import torch

    md = importlib.import_module("effedu.kernels.moe_dispatch")  # the module, even if kernels re-exports the function

    impl = {
        "numba": (lambda *a: md.moe_dispatch(*a, backend="numba"), lambda *a: md.moe_combine(*a, backend="numba")),
        "torch": (lambda *a: md.moe_dispatch(*a, backend="torch"), lambda *a: md.moe_combine(*a, backend="torch")),
        "einsum": (md.moe_dispatch_einsum, md.moe_combine_einsum),
        "loop": (md.moe_dispatch_loop, md.moe_combine_loop),
    }
    unknown = [m for m in methods if m not in impl]
    if unknown:
        raise ValueError(f"movement_fns: unknown method(s) {unknown}; expected some of {list(impl)}")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    xg, gg = x.detach().clone().requires_grad_(True), gate.detach().clone().requires_grad_(True)
    fns = {}
    for m in methods:
        dispatch, combine = impl[m]

        def forward(dispatch=dispatch, combine=combine):
            with torch.no_grad():
                return combine(dispatch(x, expert_index, slot, n_experts, capacity), expert_index, slot, gate)

        def forward_backward(dispatch=dispatch, combine=combine):
            y = combine(dispatch(xg, expert_index, slot, n_experts, capacity), expert_index, slot, gg)
            return torch.autograd.grad(y, (xg, gg), dy)

        fns[m] = (forward, forward_backward)
    return fns


def movement_table(*, n_tokens, d, n_experts, k, capacity_factor, threads, repeat, **_):
    """Table 1: dispatch + combine (identity experts) per method; forward and forward + backward, ratios to numba."""
    import torch

    expert_index, slot, gate, capacity = routing(n_tokens, n_experts, k, capacity_factor)
    x = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(2))
    fns = movement_fns(x, expert_index, slot, gate, n_experts, capacity)
    ref = fns["torch"][0]()
    agree = {m: bool(torch.allclose(fns[m][0](), ref, atol=1e-5, rtol=1e-5)) for m in METHODS}
    times = {}
    for m in steps(METHODS, "moe: dispatch+combine", label=str):
        rep = max(1, min(repeat, 3)) if m == "einsum" else repeat  # the einsum takes ~1 s a call at full size
        times[m] = [measure.time_it(fn, warmup=1, repeat=rep) for fn in fns[m]]
    rows = [{"method": LABELS[m], "key": m, "fwd_s": times[m][0], "fwd_vs_numba": times[m][0] / times["numba"][0],
             "fb_s": times[m][1], "fb_vs_numba": times[m][1] / times["numba"][1]} for m in METHODS]
    by = {r["key"]: r for r in rows}
    dropped = int((slot < 0).sum())
    onehot_bytes = n_tokens * n_experts * capacity * x.element_size()
    values = {"numba_speedup_vs_einsum": by["einsum"]["fwd_vs_numba"],
              "numba_speedup_vs_loop": by["loop"]["fwd_vs_numba"],
              "numba_speedup_vs_einsum_fwd_bwd": by["einsum"]["fb_vs_numba"],
              "numba_speedup_vs_loop_fwd_bwd": by["loop"]["fb_vs_numba"],
              "all_match_torch_reference": all(agree.values()), "capacity": capacity, "dropped": dropped,
              "onehot_bytes": onehot_bytes, "n_tokens": n_tokens, "d": d, "n_experts": n_experts, "k": k}
    einsum_ok = values["numba_speedup_vs_einsum"] >= 3
    loop_ok = values["numba_speedup_vs_loop"] > 1
    columns = [Column("method", "method", 32, "", align="<", sep=""), _ms("fwd_s", "fwd ms", sep=" | "),
               _ratio("fwd_vs_numba", "÷ numba", 8), _ms("fb_s", "fwd+bwd", sep=" | "),
               _ratio("fb_vs_numba", "÷ numba", 8)]
    notes = ["", f"targets: numba ≥ 3× faster than the one-hot einsum → {values['numba_speedup_vs_einsum']:.1f}× "
                 f"({'met' if einsum_ok else 'not met'}); faster than the per-expert loop → "
                 f"{values['numba_speedup_vs_loop']:.1f}× ({'met' if loop_ok else 'not met'}) (forward; forward + "
                 f"backward: {values['numba_speedup_vs_einsum_fwd_bwd']:.1f}× and "
                 f"{values['numba_speedup_vs_loop_fwd_bwd']:.1f}×); every method == the torch reference: "
                 f"{values['all_match_torch_reference']}",
             f"one-hot dispatch tensor (N, E, C): {onehot_bytes / 2**20:.1f} MiB and N·E·C·d = "
             f"{n_tokens * n_experts * capacity * d / 1e9:.2f} G multiply-adds per einsum, to move N·k·d = "
             f"{n_tokens * k * d / 1e6:.2f} M numbers; {dropped} of {n_tokens * k} choices dropped at C = {capacity}",
             "ms: median time of the public calls (routing checks included); ÷ numba = time / numba's time in the "
             "same run (above 1: slower than numba)"]
    title = (f"MoE dispatch + combine (identity experts): N = {n_tokens} tokens, d = {d}, E = {n_experts}, "
             f"top-{k}, capacity factor {capacity_factor:g} (C = {capacity}), float32, {threads} threads")
    return Table(title, columns, rows, notes, values)


def _layers(d, d_ff, n_experts, k, capacity_factor, modes):
    import torch

    from ..general.moe import MoEFeedForward
    from ..model import FeedForward

    layers = {}
    for m in modes:
        torch.manual_seed(0)  # the same weights in every MoE layer
        if m == "dense":
            layers[m] = FeedForward(d, k * d_ff)  # top-k: k experts' FFNs per token ≈ one FFN k times as wide
        else:
            dispatch, _, backend = m.partition("-")
            layers[m] = MoEFeedForward(d, d_ff, n_experts, k=k, capacity_factor=capacity_factor, dispatch=dispatch,
                                       backend=backend or "auto")
    return layers


def layer_table(*, n_tokens, d, d_ff, n_experts, k, capacity_factor, threads, repeat, **_):
    """Table 2: the whole MoE layer (router, dispatch, batched experts, combine) per dispatch mode, and a dense FFN."""
    import torch

    layers = _layers(d, d_ff, n_experts, k, capacity_factor, LAYER_MODES)
    x = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outs = {m: layers[m](x) for m in LAYER_MODES if m != "dense"}
    agree = all(torch.allclose(outs[m], outs["kernel-torch"], atol=1e-4, rtol=1e-4) for m in outs)
    fns = {}
    for m in LAYER_MODES:
        layer = layers[m]
        params = [p for p in layer.parameters()]

        def forward(layer=layer):
            with torch.no_grad():
                return layer(x)

        def forward_backward(layer=layer, params=params):
            return torch.autograd.grad(layer(x), params, dy)

        fns[m] = (forward, forward_backward)
        forward(), forward_backward()  # warm-up (numba compiles, buffers are allocated)
    # interleaved rounds (every mode once per round), not one mode after the other: the modes share the machine's
    # state (allocator, caches, turbo), so a mode measured first or last is not favoured; median per mode
    samples = {m: ([], []) for m in LAYER_MODES}
    for r in steps(range(repeat), "moe: layer rounds", label=lambda r: f"round {r + 1}"):
        for m in LAYER_MODES:
            if m == "einsum" and r >= 3:  # the einsum layer takes ~1 s a call at full size
                continue
            for i, fn in enumerate(fns[m]):
                samples[m][i].append(measure.time_it(fn, warmup=0, repeat=1))
    times = {m: [statistics.median(samples[m][0]), statistics.median(samples[m][1])] for m in LAYER_MODES}
    base = times["kernel-numba"]
    rows = [{"method": LAYER_LABELS[m], "key": m, "fwd_s": times[m][0], "fwd_vs_kernel": times[m][0] / base[0],
             "fb_s": times[m][1], "fb_vs_kernel": times[m][1] / base[1],
             "params": measure.count_parameters(layers[m])} for m in LAYER_MODES]
    values = {"all_modes_match": bool(agree), "moe_vs_dense_fwd_bwd": base[1] / times["dense"][1],
              "einsum_vs_kernel_fwd_bwd": times["einsum"][1] / base[1],
              "loop_vs_kernel_fwd_bwd": times["loop"][1] / base[1]}
    columns = [Column("method", "layer", 31, "", align="<", sep=""), Column("params", "params", 9, ",d"),
               _ms("fwd_s", "fwd ms", sep=" | "), _ratio("fwd_vs_kernel", "÷ numba", 8),
               _ms("fb_s", "fwd+bwd", sep=" | "), _ratio("fb_vs_kernel", "÷ numba", 8)]
    notes = ["", f"forward + backward: the einsum dispatch takes {values['einsum_vs_kernel_fwd_bwd']:.1f}× and the "
                 f"loop {values['loop_vs_kernel_fwd_bwd']:.2f}× the numba kernel's time; the MoE layer takes "
                 f"{values['moe_vs_dense_fwd_bwd']:.2f}× a dense FFN of the same FLOPs per token with "
                 f"{rows[0]['params'] / rows[-1]['params']:.1f}× its parameters; every dispatch mode gives the same "
                 f"output: {values['all_modes_match']}",
             "ms: median of interleaved rounds; fwd+bwd = forward and the gradients of every parameter; ÷ numba = time / the numba-kernel "
             "layer's time in the same run"]
    title = (f"MoEFeedForward({d}, {d_ff}, {n_experts}), top-{k}, capacity factor {capacity_factor:g}, on N = "
             f"{n_tokens} tokens, float32, {threads} threads — per dispatch mode, and a dense FFN({d}, {k * d_ff})")
    return Table(title, columns, rows, notes, values)


def expert_parallel_table(*, n_tokens, d, d_ff, n_experts, k, capacity_factor, threads, repeat, world_size=2,
                          timeout=300.0, **_):
    """Table 3: the layer expert-parallel over ``world_size`` processes; per rank, compute vs all-to-all seconds."""
    import torch

    from ..general.expert_parallel import expert_parallel_run

    layer = _layers(d, d_ff, n_experts, k, capacity_factor, ("kernel-numba",))["kernel-numba"]
    x = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(5))
    per_proc = max(1, threads // world_size)
    result = expert_parallel_run(layer, x, world_size=world_size, repeats=max(1, min(repeat, 5)), warmup=1,
                                 threads=per_proc, timeout=timeout)
    t = result["times"]
    total = max(t["total"])
    rows = []
    for part in EP_PARTS:
        row = {"part": part.replace("_", "-"), "key": part, "max_s": max(t[part]), "share": max(t[part]) / total}
        for r in range(world_size):
            row[f"rank{r}_s"] = t[part][r]
        rows.append(row)
    values = {"all_to_all_share": max(t["all_to_all"]) / total, "compute_share": max(t["compute"]) / total,
              "sent_bytes": list(result["sent_bytes"]), "world_size": world_size, "threads_per_process": per_proc,
              "dropped": list(result["dropped"]), "capacity": list(result["capacity"])}
    columns = ([Column("part", "part", 11, "", align="<", sep="")]
               + [_ms(f"rank{r}_s", f"rank {r + 1}", sep=" | " if r == 0 else " ") for r in range(world_size)]
               + [_ms("max_s", "max", sep=" | "), Column("share", "of total", 9, ".0%")])
    notes = ["", f"all-to-all: {values['all_to_all_share']:.0%} of the slowest rank's step (max over ranks, "
                 f"each part separately); bytes sent to the other rank per step: "
                 f"{', '.join(f'{b / 2**20:.2f} MiB' for b in values['sent_bytes'])} (ranks 1…{world_size})",
             "one step = forward + backward of the layer; the fastest of the timed steps; all-to-all = time inside "
             "the exchanges (waiting for the other rank included), compute = total − all-to-all, all-reduce = the "
             f"router gradients' sum after the step; gloo over loopback, {per_proc} thread(s) per process"]
    title = (f"expert parallelism: MoEFeedForward({d}, {d_ff}, {n_experts}) top-{k} on N = {n_tokens} tokens, "
             f"{world_size} processes × {n_experts // world_size} experts, {n_tokens // world_size} tokens each")
    return Table(title, columns, rows, notes, values)


def bench_moe(opts):
    """MoE: dispatch+combine (numba vs one-hot einsum vs per-expert loop), the layer, and 2-process expert parallelism."""
    size = sizes(opts.quick)
    tables = []
    for which in steps(["dispatch+combine", "layer", "expert parallel"], "moe", label=str):
        if which == "dispatch+combine":
            tables.append(movement_table(threads=opts.threads, **size))
        elif which == "layer":
            tables.append(layer_table(threads=opts.threads, **size))
        else:
            tables.append(expert_parallel_table(threads=opts.threads, **size))
    return tables


__all__ = ["bench_moe", "movement_table", "layer_table", "expert_parallel_table", "movement_fns", "routing", "sizes",
           "METHODS", "LABELS", "LAYER_MODES", "LAYER_LABELS", "EP_PARTS"]

