"""Expert parallelism: a mixture-of-experts layer spread over real processes (chapter 10; survey §3.8).

Papers: Lepikhin et al. 2021, *GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding*
(ICLR) — experts sharded over devices, tokens split into *groups*, one ``AllToAll`` to send tokens to their
experts' devices and one to bring the results back; Fedus, Zoph & Shazeer 2022, *Switch Transformers* (JMLR) —
the same with top-1 routing. Chapter 10 starts in ``effedu.general.moe`` (routing, capacity, the layer); this
module runs that layer's experts on ``world_size`` processes.

**Expert parallelism.** With E experts and W processes ("ranks"), rank r holds the E/W experts
``r·E/W … (r+1)·E/W − 1`` and a full copy of the (small) router. The N tokens are split into W equal groups; rank r
owns group r (GShard's groups: capacity, routing and dropping are per group). One forward step on rank r:

1. route its n = N/W tokens (``layer.route``): expert and slot of each choice, capacity C = ceil(k·n/E·cf);
2. dispatch them into buffers ``(E, C, d)`` (``effedu.kernels.moe_dispatch``) and keep only the filled rows, in
   (expert, slot) order: rows for the experts of rank 0 first, then rank 1, ... — ``counts[e]`` rows for expert e;
3. exchange the counts (an all-to-all of E integers), so every rank knows how many rows it will receive from each
   rank for each of its experts;
4. **all-to-all** the rows (``torch.distributed.all_to_all_single`` with *split sizes*: a rank sends
   Σ_{e on rank q} counts[e] rows to rank q — only kept tokens travel, not the padding of the buffers);
5. the rank's experts run on what they received: each expert's rows from all ranks packed into one buffer
   (``layer.experts_forward(buffers (E/W, C', d), experts=slice)``, C' the busiest expert's rows, ≤ W·C);
6. **all-to-all back** (the split sizes reversed): every row returns to the rank that sent it, in the order sent;
7. combine with the gates (``effedu.kernels.moe_combine``): y = Σⱼ kept · gate · expert output.

The backward pass is the same exchange in reverse: :class:`AllToAll` is an autograd Function whose backward is an
all-to-all with the input and output split sizes swapped (a gradient row goes back to the rank its token came
from). Router gradients (the router is replicated, like data-parallel weights) are summed over ranks with an
``all_reduce``; each expert's gradients live on its owner only. The result equals the single-process layer applied
group by group: outputs ``torch.cat([layer(x_g) for x_g in groups])`` and gradients summed over the groups
(:func:`expert_parallel_reference`, the oracle of the tests).

Communication per step and rank: each kept choice's row of d numbers leaves its rank once going forward and comes
back once; the backward pass moves the same amount again — 4·(kept choices sent off-rank)·d·(bytes per number),
plus the counts. Everything here uses the backend-agnostic ``torch.distributed`` API only (``all_to_all_single``,
``all_reduce``, ``barrier``): this course runs the gloo backend on the CPU, processes on one machine, loopback only
(``effedu.general.processes``); on ≥ 2 GPUs the same code runs with the nccl backend, one device per rank, the
tensors moved to that device (not done or tested here). Production systems — DeepSpeed-MoE, Megatron-LM's
``MoEAlltoAllTokenDispatcher``, Tutel, FairScale's ``MOELayer`` — use the same two all-to-alls (often overlapped
with computation, and with expert + data + tensor parallelism combined).
"""
from __future__ import annotations

import copy
import math
import time
import traceback

import torch
import torch.nn as nn

from .._checks import check_int
from ..kernels.moe_dispatch import moe_combine, moe_dispatch

from .processes import init_gloo, launch, write_result

EXPERT_PARAMETERS = ("w_in", "b_in", "w_out", "b_out")  # batched over experts: leading dimension E (moe.MoEFeedForward)


# --------------------------------------------------------------------------------------------------------------
# 1. the differentiable all-to-all
# --------------------------------------------------------------------------------------------------------------


class CommMeter:
    """What one rank spent communicating: seconds inside collectives and bytes it sent to *other* ranks."""

    def __init__(self, rank=0):
        self.rank = rank
        self.seconds = 0.0
        self.sent_bytes = 0

    def reset(self):
        self.seconds, self.sent_bytes = 0.0, 0


def all_to_all_rows(x, output_splits, input_splits, meter=None):
    """Rows of ``x`` to every rank: rows ``input_splits[0]`` go to rank 0, the next ``input_splits[1]`` to rank 1, ...;
    returns the rows received, ``output_splits[q]`` from rank q, in rank order (not differentiable: see
    :class:`AllToAll`). Must be called by every rank of the process group at the same point.
    """
    import torch.distributed as dist

    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    start = time.perf_counter()
    dist.all_to_all_single(out, x, output_split_sizes=list(output_splits), input_split_sizes=list(input_splits))
    if meter is not None:
        meter.seconds += time.perf_counter() - start  # includes waiting for the slowest rank to arrive
        row_bytes = x.element_size() * math.prod(x.shape[1:])
        meter.sent_bytes += row_bytes * sum(n for q, n in enumerate(input_splits) if q != meter.rank)
    return out


class AllToAll(torch.autograd.Function):
    """The all-to-all as an autograd Function: forward sends rows by ``input_splits`` and receives ``output_splits``;
    backward sends the gradient rows back where they came from — the same collective, split sizes swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, meter):
        ctx.splits, ctx.meter = (list(output_splits), list(input_splits)), meter
        return all_to_all_rows(x, output_splits, input_splits, meter)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        # ∂L/∂x: each received row's gradient returns to its sender, in the order it was sent
        return all_to_all_rows(grad, input_splits, output_splits, ctx.meter), None, None, None


# --------------------------------------------------------------------------------------------------------------
# 2. one rank's forward step
# --------------------------------------------------------------------------------------------------------------


def _layer_sizes(layer, world_size, where):
    """(E, experts per rank) of an ``effedu.general.moe.MoEFeedForward``-like layer, checked against the world size."""
    missing = [n for n in ("route", "experts_forward", "w_in") if not hasattr(layer, n)]
    if not isinstance(layer, nn.Module) or missing:
        raise TypeError(f"{where}: layer must be an effedu.general.moe.MoEFeedForward (an nn.Module with route, "
                        f"experts_forward and batched expert weights w_in (E, d, d_ff)), got {type(layer).__name__}")
    E = layer.w_in.shape[0]
    if E % world_size:
        raise ValueError(f"{where}: world_size={world_size} does not divide the layer's n_experts={E}: every rank "
                         f"must hold the same number of experts (choose a world size that divides {E})")
    return E, E // world_size


def expert_parallel_forward(layer, x, *, rank, world_size, meter=None, backend="torch"):
    """One rank's share of the expert-parallel layer: its tokens ``x (n, d)`` in, their outputs ``(n, d)`` out.

    Runs inside a process group of ``world_size`` ranks (every rank calls it at the same point, with the same number
    of tokens); this rank holds experts ``rank·E/W … (rank+1)·E/W − 1`` of ``layer``. Differentiable: gradients reach
    ``x``, the router and this rank's experts (through :class:`AllToAll`). Returns ``(y, routing)`` with routing
    the dict of ``layer.route(x)``.
    """
    W = world_size
    E, El = _layer_sizes(layer, W, "expert_parallel_forward")
    d = x.shape[1]
    routing = layer.route(x)
    expert_index, slot, gate, C = routing["expert_index"], routing["slot"], routing["gate"], int(routing["capacity"])

    # dispatch into this group's buffers (E, C, d), keep the filled rows in (expert, slot) order
    buffers = moe_dispatch(x, expert_index, slot, E, C, backend=backend)
    kept = slot >= 0
    filled_rows = torch.zeros(E * C, dtype=torch.bool, device=x.device)
    filled_rows[(expert_index * C + slot)[kept]] = True
    filled = filled_rows.nonzero().squeeze(1)  # row e·C + s, ascending: expert by expert = rank by rank
    counts = filled_rows.view(E, C).sum(1)  # (E,) rows this group sends to each expert
    send = buffers.reshape(E * C, d).index_select(0, filled)
    input_splits = counts.view(W, El).sum(1).tolist()  # rows to each rank

    # exchange the counts: recv_counts[s, e'] = rows rank s sends to this rank's expert e'
    recv_counts = all_to_all_rows(counts, [El] * W, [El] * W, meter).view(W, El)
    output_splits = recv_counts.sum(1).tolist()
    recv = AllToAll.apply(send, output_splits, input_splits, meter)  # (Σ recv_counts, d), by source, expert, slot

    # this rank's buffers (E/W, C', d): expert e' receives Σ_s recv_counts[s, e'] rows, packed source by source
    # (C' = the busiest of them; a group's capacity C bounds each source's share)
    c = recv_counts.reshape(-1)  # rows per (source, expert) pair, in the order they arrived
    per_expert = recv_counts.sum(0)  # (E/W,)
    C_local = max(1, int(per_expert.max()))
    offset = torch.cumsum(recv_counts, 0) - recv_counts  # (W, E/W): rows of expert e' from sources before s
    base = (torch.arange(El, device=x.device) * C_local + offset).reshape(-1)  # first row of each (s, e') block
    first = torch.cumsum(c, 0) - c
    pos = base.repeat_interleave(c) + torch.arange(int(c.sum()), device=x.device) - first.repeat_interleave(c)
    local = recv.new_zeros(El * C_local, d).index_copy(0, pos, recv).view(El, C_local, d)
    out_local = layer.experts_forward(local, experts=slice(rank * El, (rank + 1) * El))
    back = out_local.reshape(El * C_local, d).index_select(0, pos)

    # all-to-all back (split sizes swapped): rows return in the order they were sent, then combine with the gates
    returned = AllToAll.apply(back, input_splits, output_splits, meter)
    expert_out = returned.new_zeros(E * C, d).index_copy(0, filled, returned).view(E, C, d)
    y = moe_combine(expert_out, expert_index, slot, gate.to(expert_out.dtype), backend=backend)
    return y, routing


def group_aux_loss(layer, x, routing):
    """The auxiliary loss of ``layer`` on one group ``x (n, d)`` with its ``routing`` (a float), as the layer records
    it: ``aux_weight · load_balancing_loss + z_weight · router_z_loss`` (``effedu.general.moe``)."""
    from .moe import load_balancing_loss, router_z_loss

    with torch.no_grad():
        aux = layer.aux_weight * load_balancing_loss(routing["router_probs"], routing["expert_index"])
        if getattr(layer, "z_weight", 0.0):
            aux = aux + layer.z_weight * router_z_loss(layer.router(x))
    return float(aux)


# --------------------------------------------------------------------------------------------------------------
# 3. the processes
# --------------------------------------------------------------------------------------------------------------


def _is_expert_parameter(name):
    return name.rsplit(".", 1)[-1] in EXPERT_PARAMETERS


def _expert_parallel_worker(rank, world_size, store_path, result_dir, spec):
    """One rank of :func:`expert_parallel_runs` (runs in its own process)."""
    dist = None
    try:
        dist = init_gloo(rank, world_size, store_path, spec["timeout"], spec["threads"])
        results = [_run_case(dist, rank, world_size, case, spec) for case in spec["cases"]]
        dist.barrier()
        write_result(result_dir, rank, {"results": results})
    except BaseException:
        write_result(result_dir, rank, {"error": traceback.format_exc()})
        raise
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _run_case(dist, rank, world_size, case, spec):
    """``warmup`` + ``repeats`` forward/backward steps of one case on this rank; what the parent needs of it."""
    layer, where = case["layer"], "expert_parallel_run"
    n = case["x"].shape[0] // world_size
    x_r = case["x"][rank * n:(rank + 1) * n]
    g_r = case["grad_output"][rank * n:(rank + 1) * n]
    _, El = _layer_sizes(layer, world_size, where)
    meter = CommMeter(rank)
    steps = []
    for step in range(spec["warmup"] + spec["repeats"]):
        layer.zero_grad(set_to_none=True)
        x_in = x_r.detach().clone().requires_grad_()
        meter.reset()
        dist.barrier()  # every rank starts its clock together
        start = time.perf_counter()
        y, routing = expert_parallel_forward(layer, x_in, rank=rank, world_size=world_size, meter=meter,
                                             backend=case["backend"])
        torch.autograd.backward(y, g_r)
        total = time.perf_counter() - start
        a2a, sent = meter.seconds, meter.sent_bytes
        # the router is replicated (data parallel): sum its gradients over the ranks
        start = time.perf_counter()
        for name, p in layer.named_parameters():
            if not _is_expert_parameter(name):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g)
                p.grad = g
        reduce_time = time.perf_counter() - start
        if step >= spec["warmup"]:
            steps.append({"total": total, "all_to_all": a2a, "compute": total - a2a, "all_reduce": reduce_time,
                          "sent_bytes": sent})
    own = slice(rank * El, (rank + 1) * El)
    grads = {}
    for name, p in layer.named_parameters():
        if _is_expert_parameter(name):  # this rank's experts only: the others' are computed by their owners
            grads[name] = (torch.zeros_like(p[own]) if p.grad is None else p.grad[own]).detach().clone()
        elif rank == 0:  # replicated, already summed: every rank holds the same
            grads[name] = p.grad.detach().clone()
    return {"output": y.detach().clone(), "x_grad": x_in.grad.detach().clone(), "grads": grads,
            "aux_loss": group_aux_loss(layer, x_r, routing), "dropped": int((routing["slot"] < 0).sum()),
            "capacity": int(routing["capacity"]), "steps": steps}


def _check_run_args(where, layer, x, world_size, grad_output):
    """Checks one case; returns (W, grad_output as a CPU tensor: the seeded default for None)."""
    W = check_int(world_size, "world_size", where)
    _layer_sizes(layer, W, where)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a 2-D tensor (N, d) of tokens, got {got}")
    d = layer.w_in.shape[1]
    if x.shape[1] != d:
        raise ValueError(f"{where}: x must have the layer's d_model={d} features per token, got {x.shape[1]}")
    if x.dtype != layer.w_in.dtype:
        raise TypeError(f"{where}: x must have the layer's dtype {layer.w_in.dtype}, got {x.dtype}")
    N = x.shape[0]
    if N == 0 or N % W:
        raise ValueError(f"{where}: the N={N} tokens must split into world_size={W} equal groups (N divisible by "
                         f"{W}, N ≥ {W})")
    if grad_output is None:
        gen = torch.Generator().manual_seed(0)
        grad_output = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    elif not isinstance(grad_output, torch.Tensor) or grad_output.shape != x.shape:
        got = tuple(grad_output.shape) if isinstance(grad_output, torch.Tensor) else type(grad_output).__name__
        raise ValueError(f"{where}: grad_output must be a tensor of x's shape {tuple(x.shape)}, got {got}")
    return W, grad_output.detach().to(x.dtype).cpu()


def expert_parallel_runs(cases, *, world_size=2, repeats=1, warmup=1, threads=1, timeout=120.0):
    """Several expert-parallel runs in *one* launch of ``world_size`` processes (spawning costs seconds).

    ``cases``: a list of dicts ``{"layer": MoEFeedForward, "x": (N, d)}`` with optional ``"grad_output"`` and
    ``"backend"`` (see :func:`expert_parallel_run`). Returns one result dict per case, as :func:`expert_parallel_run`.
    """
    return _launch_cases(cases, world_size, repeats, warmup, threads, timeout, "expert_parallel_runs")


_NOT_SENT = ("aux_channel", "last_routing", "last_aux")  # per-forward state of a MoEFeedForward, not its weights


def _launch_cases(cases, world_size, repeats, warmup, threads, timeout, where):
    W = check_int(world_size, "world_size", where)
    check_int(repeats, "repeats", where)
    check_int(warmup, "warmup", where, minimum=0)
    check_int(threads, "threads", where)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(cases, (list, tuple)) or not cases or not all(isinstance(c, dict) for c in cases):
        raise TypeError(f"{where}: cases must be a non-empty list of dicts {{'layer': ..., 'x': ...}}")
    specs = []
    for c in cases:
        if "layer" not in c or "x" not in c or set(c) - {"layer", "x", "grad_output", "backend"}:
            raise TypeError(f"{where}: each case must be a dict with 'layer' and 'x' (and optional 'grad_output', "
                            f"'backend'), got keys {sorted(c)}")
        layer, x = c["layer"], c["x"]
        _, grad_output = _check_run_args(where, layer, x, W, c.get("grad_output"))
        backend = c.get("backend")
        backend = getattr(layer, "backend", "auto") if backend is None else backend
        if not isinstance(backend, str):
            raise TypeError(f"{where}: backend must be a str ('auto', 'torch', 'numba', 'cuda'), got {backend!r}")
        # what each process rebuilds (pickled by spawn): the weights, not the model's aux-loss channel (its records
        # may hold autograd graphs) nor the last forward's routing
        memo = {id(v): None for a in _NOT_SENT if (v := layer.__dict__.get(a)) is not None}
        child = copy.deepcopy(layer, memo).cpu()
        child.zero_grad(set_to_none=True)
        specs.append({"layer": child, "x": x.detach().cpu(), "grad_output": grad_output, "backend": backend})
    spec = {"cases": specs, "repeats": repeats, "warmup": warmup, "threads": threads, "timeout": float(timeout)}
    payloads = launch(_expert_parallel_worker, where, W, spec, timeout, what="rank")
    return [_assemble(layer_of["layer"], [p["results"][i] for p in payloads], W) for i, layer_of in enumerate(cases)]


def _assemble(layer, per_rank, W):
    """One case's per-rank results → the full output, gradients in the layer's shapes, times of the fastest step."""
    n_steps = len(per_rank[0]["steps"])
    slowest = [max(r["steps"][i]["total"] for r in per_rank) for i in range(n_steps)]
    best = min(range(n_steps), key=lambda i: slowest[i])
    grads = {}
    for name, _ in layer.named_parameters():
        if _is_expert_parameter(name):
            grads[name] = torch.cat([r["grads"][name] for r in per_rank])  # experts in rank order = index order
        else:
            grads[name] = per_rank[0]["grads"][name]
    return {
        "output": torch.cat([r["output"] for r in per_rank]),
        "x_grad": torch.cat([r["x_grad"] for r in per_rank]),
        "grads": grads,
        "aux_loss": sum(r["aux_loss"] for r in per_rank) / W,
        "dropped": [r["dropped"] for r in per_rank],
        "capacity": [r["capacity"] for r in per_rank],
        "times": {key: [r["steps"][best][key] for r in per_rank]
                  for key in ("compute", "all_to_all", "total", "all_reduce")},
        "step_times": slowest,
        "sent_bytes": [r["steps"][best]["sent_bytes"] for r in per_rank],
        "world_size": W,
    }


def expert_parallel_run(layer, x, *, world_size=2, grad_output=None, repeats=1, warmup=1, threads=1, timeout=120.0,
                        backend=None):
    """The MoE ``layer`` run expert-parallel on ``world_size`` processes: one forward and backward per step.

    ``layer``: an ``effedu.general.moe.MoEFeedForward`` (its n_experts divisible by ``world_size``); ``x (N, d)``:
    the tokens, N divisible by ``world_size`` — rank r owns the r-th group of N/W consecutive tokens and the experts
    ``r·E/W … (r+1)·E/W − 1``; the router is replicated. Each step runs :func:`expert_parallel_forward` on every rank
    and back-propagates ``grad_output`` (default: a fixed seeded normal tensor of x's shape). ``warmup`` untimed
    steps first, then ``repeats`` timed ones. Processes: spawned, gloo on the CPU, loopback only, joined or
    terminated whatever happens, ``timeout`` seconds in all (``effedu.general.processes.launch``); ``threads``
    intra-op threads each; ``backend`` of the dispatch/combine kernels (None: the layer's ``backend``; numba
    compiles in every process, seconds, so warm up). A noisy router in training mode (and dropout) draws its own
    random numbers in every process, so only a deterministic layer reproduces :func:`expert_parallel_reference`
    exactly. From a script, call it under ``if __name__ == "__main__":``. Several configurations: one launch with
    :func:`expert_parallel_runs`.

    Returns a dict: ``output (N, d)``; ``x_grad (N, d)``; ``grads`` ``{parameter name: gradient}`` in the full
    shapes (router gradients summed over ranks by an all_reduce; each expert's gradient from the rank that owns it);
    ``aux_loss`` (float: the layer's auxiliary loss, mean over the groups; its gradient is not part of ``grads``);
    ``dropped`` (dropped choices per rank) and ``capacity`` (per rank's group); ``times`` ``{"compute",
    "all_to_all", "total", "all_reduce"}``: per rank, seconds of the fastest step (smallest slowest-rank total) —
    ``total`` is forward + backward, ``all_to_all`` the time inside the exchanges (waiting for the other ranks
    included), ``compute`` = total − all_to_all, ``all_reduce`` the router-gradient sum after the step;
    ``step_times`` (the slowest rank's total, every timed step); ``sent_bytes``: per rank, bytes sent to *other*
    ranks in one step (forward and backward); ``world_size``.
    """
    case = {"layer": layer, "x": x, "grad_output": grad_output, "backend": backend}
    return _launch_cases([case], world_size, repeats, warmup, threads, timeout, "expert_parallel_run")[0]


def expert_parallel_reference(layer, x, *, world_size=2, grad_output=None):
    """The oracle, in this process: ``layer`` applied group by group (GShard's groups), gradients summed.

    Returns ``output = torch.cat([layer(x_g) for x_g in groups])``, ``x_grad``, ``grads`` (the sum over the
    groups of each parameter's gradient for ``grad_output``, default the seeded tensor of :func:`expert_parallel_run`)
    and ``aux_loss`` (mean over the groups) — what :func:`expert_parallel_run` must return. The layer's ``.grad``
    are left as they were.
    """
    where = "expert_parallel_reference"
    W, grad_output = _check_run_args(where, layer, x, world_size, grad_output)
    saved = {name: p.grad for name, p in layer.named_parameters()}
    channel = layer.__dict__.get("aux_channel")
    try:
        if channel is not None:
            layer.aux_channel = None  # inside a Transformer: record nothing in the model's aux-loss channel
        layer.zero_grad(set_to_none=True)
        x_in = x.detach().clone().requires_grad_()
        outs, aux = [], []
        for x_g in x_in.chunk(W):
            outs.append(layer(x_g))
            aux.append(float(layer.last_aux))  # the layer's own record of its auxiliary loss
        y = torch.cat(outs)
        torch.autograd.backward(y, grad_output.to(y.dtype))
        grads = {name: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                 for name, p in layer.named_parameters()}
    finally:
        for name, p in layer.named_parameters():
            p.grad = saved[name]
        if channel is not None:
            layer.aux_channel = channel
    return {"output": y.detach(), "x_grad": x_in.grad.detach(), "grads": grads, "aux_loss": sum(aux) / W}


__all__ = ["AllToAll", "CommMeter", "all_to_all_rows", "expert_parallel_forward", "group_aux_loss",
           "expert_parallel_run", "expert_parallel_runs", "expert_parallel_reference", "EXPERT_PARAMETERS"]
