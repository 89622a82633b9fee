"""Pipeline parallelism: the GPipe schedule, its bubble, and a real pipeline of processes (survey §3.7).

Paper: Huang et al. 2019, *GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism*
(NeurIPS); rematerialisation from Chen et al. 2016, *Training Deep Nets with Sublinear Memory Cost* (chapter 02).
Chapter 09 starts in ``effedu.general.microbatch`` (micro-batches and exact gradient accumulation); this module runs
those micro-batches through a pipeline, and ``microbatch`` re-exports every name defined here.

**Pipeline parallelism (GPipe).** Put consecutive layers on K devices ("stages"). Stage s computes its layers and
sends the activations to stage s+1. In the backward pass, stage s+1 sends the gradient with respect to those
activations back to stage s. With one batch only one stage works at a time. GPipe feeds the M micro-batches in a
wave: micro-batch m runs forward on stage s at tick s + m. After the last forward (a *flush*) the backward wave runs
from the last stage to the first. Each stage is busy for 2M of the 2(M+K−1) ticks, so the idle *bubble* is

    bubble = (K − 1) / (M + K − 1)                      (GPipe; negligible when M ≥ 4K)

Each stage holds the activations of all M micro-batches at the end of the forward wave. GPipe therefore
*rematerialises* them: a stage keeps only its input per micro-batch and recomputes the rest in the backward pass
(chapter 02's ``checkpoint``).

This module holds, in reading order:

1. ``gpipe_schedule``, ``check_schedule``, ``stage_actions``, ``idle_fraction`` and ``bubble_fraction``; reading a
   measured run: ``measured_bubble``, ``busy_fractions``, ``handoff_latencies`` and ``ideal_step_time`` (what the
   formula predicts from an M = 1 run);
2. ``split_transformer``: an ``effedu.model.Transformer`` cut into K :class:`TransformerStage` s;
3. :class:`StageRunner`: one stage's forward and backward actions, through a *channel* (a mailbox in one process,
   ``torch.distributed`` between processes); ``simulate_pipeline`` runs a schedule in one process, deterministic,
   with per-stage activation bytes;
4. ``run_pipeline`` / ``run_pipelines``: a real pipeline, one process per stage, ``torch.distributed`` (gloo,
   loopback only) ``send``/``recv`` between stages, with measured per-stage timings and memory. On GPUs the same
   pattern runs with the nccl backend, one device per stage (the receive buffers would then live on that device).
   Each configuration is repeated in interleaved rounds and the fastest run kept (``pick="best"``);
5. ``run_torch_pipeline``: ``torch.distributed.pipelining`` (PyTorch's production pipeline), never used by the
   code above: the oracle of the tests and the production cell of the notebook.

The Gantt charts (``plot_gantt``, ``plot_gpipe``, ``plot_measured_pipeline``) live in ``effedu.viz``.
"""
from __future__ import annotations

import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_batch, check_int
from ..measure import SavedTensorTracker, parameter_storages
from ..model import IGNORE, Transformer

from .checkpoint import checkpoint  # rematerialisation reuses chapter 02's from-scratch checkpoint
from .processes import init_gloo, launch, write_result  # spawn, rendezvous, results: shared with expert_parallel


def _micro_batches(batch, n_micro, weight_by, allow_uneven, where):
    """The micro-batches of ``batch`` and the weight of each one's loss (``effedu.general.microbatch``).

    ``microbatch`` re-exports this module's names, so it is imported here, when a pipeline runs, not at the top.
    """
    from .microbatch import check_weight_by, micro_weights, split_batch

    check_weight_by(weight_by, batch[1], where)
    micro = split_batch(batch, n_micro, allow_uneven=allow_uneven)
    return micro, micro_weights([mb.targets for mb in micro], weight_by)


def _loss_or_default(loss_fn):
    """``loss_fn``, or the mean cross-entropy over scored tokens (``microbatch.token_cross_entropy``) for None."""
    from .microbatch import token_cross_entropy

    return token_cross_entropy if loss_fn is None else loss_fn


# --------------------------------------------------------------------------------------------------------------
# 1. the GPipe schedule and its bubble
# --------------------------------------------------------------------------------------------------------------


def gpipe_schedule(n_stages, n_micro):
    """The GPipe schedule: a list of ticks, each a dict ``{stage: ("F" | "B", micro-batch)}`` (idle stages absent).

    All forwards, then all backwards. One forward or one backward takes one tick. Micro-batch m runs forward on
    stage s at tick s + m. After the flush the backward wave starts at the last stage: micro-batch m runs backward
    on stage s at tick (M + K − 1) + (K − 1 − s) + m. 2(M + K − 1) ticks in all.
    """
    where = "gpipe_schedule"
    K = check_int(n_stages, "n_stages", where)
    M = check_int(n_micro, "n_micro", where)
    ticks = [dict() for _ in range(2 * (M + K - 1))]
    for m in range(M):
        for s in range(K):
            # forward wave: tick = s + m
            ticks[s + m][s] = ("F", m)
            # backward wave, after all M + K − 1 forward ticks: tick = (M + K − 1) + (K − 1 − s) + m
            ticks[(M + K - 1) + (K - 1 - s) + m][s] = ("B", m)
    return [dict(sorted(t.items())) for t in ticks]


def check_schedule(schedule, n_stages, n_micro):
    """Raise ``ValueError`` unless ``schedule`` is a valid pipeline schedule; return True.

    Valid: every stage runs ("F", m) and ("B", m) exactly once for every micro-batch m. F(s, m) comes after
    F(s−1, m) (it needs that output). B(s, m) comes after F(s, m) and after B(s+1, m) (it needs that gradient).
    Any schedule that passes (GPipe, 1F1B, your own) can be run by ``simulate_pipeline`` and ``run_pipeline``.
    """
    where = "check_schedule"
    K = check_int(n_stages, "n_stages", where)
    M = check_int(n_micro, "n_micro", where)
    if not isinstance(schedule, (list, tuple)):
        raise TypeError(f"{where}: schedule must be a list of ticks (dicts stage → (kind, micro)), got {type(schedule).__name__}")
    when = {}
    for t, tick in enumerate(schedule):
        if not isinstance(tick, dict):
            raise TypeError(f"{where}: tick {t} must be a dict stage → (kind, micro), got {type(tick).__name__}")
        for s, action in tick.items():
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < K:
                raise ValueError(f"{where}: tick {t}: stage must be an int in [0, {K}), got {s!r}")
            if not (isinstance(action, (tuple, list)) and len(action) == 2 and action[0] in ("F", "B")
                    and isinstance(action[1], int) and 0 <= action[1] < M):
                raise ValueError(f"{where}: tick {t}, stage {s}: action must be ('F' | 'B', micro in [0, {M})), got {action!r}")
            key = (action[0], s, action[1])
            if key in when:
                raise ValueError(f"{where}: {action[0]}{action[1]} runs twice on stage {s} (ticks {when[key]} and {t})")
            when[key] = t
    for s in range(K):
        for m in range(M):
            for kind in "FB":
                if (kind, s, m) not in when:
                    raise ValueError(f"{where}: stage {s} never runs {kind}{m}")
            if s > 0 and when[("F", s, m)] <= when[("F", s - 1, m)]:
                raise ValueError(f"{where}: F{m} on stage {s} (tick {when[('F', s, m)]}) must come after F{m} on stage {s - 1} "
                                 f"(tick {when[('F', s - 1, m)]})")
            if when[("B", s, m)] <= when[("F", s, m)]:
                raise ValueError(f"{where}: B{m} on stage {s} (tick {when[('B', s, m)]}) must come after its forward "
                                 f"(tick {when[('F', s, m)]})")
            if s < K - 1 and when[("B", s, m)] <= when[("B", s + 1, m)]:
                raise ValueError(f"{where}: B{m} on stage {s} (tick {when[('B', s, m)]}) must come after B{m} on stage {s + 1} "
                                 f"(tick {when[('B', s + 1, m)]})")
    return True


def stage_actions(schedule, stage):
    """The actions of one stage in the order it runs them: ``[("F", 0), ("F", 1), ..., ("B", 0), ...]``."""
    return [tick[stage] for tick in schedule if stage in tick]


def idle_fraction(schedule, n_stages):
    """Counted bubble: idle (stage, tick) slots / all slots, over the schedule's length."""
    K = check_int(n_stages, "n_stages", "idle_fraction")
    busy = sum(len(tick) for tick in schedule)
    slots = K * len(schedule)
    # bubble = idle slots / (K · ticks)
    return (slots - busy) / slots


def bubble_fraction(n_stages, n_micro):
    """GPipe's bubble: the idle share of the pipeline, (K − 1) / (M + K − 1)."""
    K = check_int(n_stages, "n_stages", "bubble_fraction")
    M = check_int(n_micro, "n_micro", "bubble_fraction")
    # bubble = (K − 1) / (M + K − 1)
    return (K - 1) / (M + K - 1)


def schedule_events(schedule):
    """The schedule as events ``{"stage", "kind", "micro", "start", "end"}`` in ticks (for :func:`plot_gantt`)."""
    return [{"stage": s, "kind": kind, "micro": m, "start": t, "end": t + 1}
            for t, tick in enumerate(schedule) for s, (kind, m) in tick.items()]


def busy_fractions(events, n_stages=None):
    """Per stage: its busy time / the step's span (first start → last end over all stages).

    GPipe predicts M / (M + K − 1) for every stage (1 − the bubble); a stage with more work (the last one holds the
    LM head and the loss) is busier, and waiting for a hand-off shows up as idle time.
    """
    if not events:
        raise ValueError("busy_fractions: events is empty")
    K = n_stages if n_stages is not None else 1 + max(e["stage"] for e in events)
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    return [sum(e["end"] - e["start"] for e in events if e["stage"] == s) / span for s in range(K)]


def handoff_latencies(events):
    """Hand-off delays (same unit as the events) on the critical path of a measured pipeline.

    For every action whose stage was idle, waiting for its input (the forward output of the previous stage, or the
    gradient from the next one): the time from the sender finishing that computation to the receiver starting.
    It holds the send, the copy through the backend and the wake-up of the waiting process.
    """
    done = {(e["stage"], e["kind"], e["micro"]): e for e in events}
    waits = []
    for e in events:
        src = (e["stage"] - 1, "F", e["micro"]) if e["kind"] == "F" else (e["stage"] + 1, "B", e["micro"])
        prev = [p["end"] for p in events if p["stage"] == e["stage"] and p["end"] <= e["start"]]
        if src in done and done[src]["end"] >= max(prev, default=float("-inf")):  # the receiver was idle, waiting
            waits.append(e["start"] - done[src]["end"])
    return waits


def ideal_step_time(events, n_micro, n_stages=None):
    """The step time GPipe predicts for ``n_micro`` micro-batches from a measured run (usually M = 1).

    Assumes what the bubble formula assumes: a micro-batch costs exactly 1/M of the batch on each stage, and hand-
    offs are free. With fₛ, bₛ the forward and backward time of one micro-batch on stage s (the measured per-stage
    totals / M), a wave through K stages ends after Σₛ fₛ + (M − 1)·maxₛ fₛ (the slowest stage sets the pace), then
    the backward wave takes Σₛ bₛ + (M − 1)·maxₛ bₛ. For equal stages, busy / (K × this) = 1 − (K−1)/(M+K−1).
    """
    M = check_int(n_micro, "n_micro", "ideal_step_time")
    if not events:
        raise ValueError("ideal_step_time: events is empty")
    K = n_stages if n_stages is not None else 1 + max(e["stage"] for e in events)
    total = {(s, kind): 0.0 for s in range(K) for kind in "FB"}
    for e in events:
        total[(e["stage"], e["kind"])] += e["end"] - e["start"]
    f = [total[(s, "F")] / M for s in range(K)]
    b = [total[(s, "B")] / M for s in range(K)]
    # makespan = Σ fₛ + (M − 1) max fₛ  +  Σ bₛ + (M − 1) max bₛ
    return sum(f) + (M - 1) * max(f) + sum(b) + (M - 1) * max(b)


def measured_bubble(events, n_stages=None):
    """Bubble measured from timed events: 1 − Σ busy time / (K × span), span = first start → last end."""
    if not events:
        raise ValueError("measured_bubble: events is empty")
    K = n_stages if n_stages is not None else 1 + max(e["stage"] for e in events)
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    # bubble = 1 − busy / (K · span)
    return 1.0 - busy / (K * span)


# --------------------------------------------------------------------------------------------------------------
# 2. cutting the Transformer into stages
# --------------------------------------------------------------------------------------------------------------


class TransformerStage(nn.Module):
    """Consecutive layers of an ``effedu.model.Transformer``, sharing its modules (not copies).

    Stage 0 also owns the embeddings (its input is token ids ``(B, T)``); the last stage owns the final LayerNorm
    and the LM head (its output is logits ``(B, T, V)``); the others map ``(B, T, d) → (B, T, d)``. The first and
    last steps are the model's own (``Transformer.embed_tokens`` and ``Transformer.logits``), not copies.
    """

    def __init__(self, model, first_block, last_block, *, index, n_stages):
        super().__init__()
        self.index, self.n_stages = index, n_stages
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.block_range = (first_block, last_block)
        self.d_model = model.config.d_model
        self.vocab_size = model.config.vocab_size
        if self.is_first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
            self.embed_tokens = model.embed_tokens  # a bound method, not a submodule: the stage owns only its layers
        self.blocks = nn.ModuleList(model.blocks[first_block:last_block])
        if self.is_last:
            self.ln_f, self.head = model.ln_f, model.head
            self.logits = model.logits

    def embed(self, tokens):
        """Stage 0's first step: token + position embedding, ``(B, T)`` ids → ``(B, T, d)``."""
        # x₀ = E[tokens] + P[positions]
        return self.embed_tokens(tokens)

    def body(self, x):
        """The stage's blocks (+ final LN and head on the last stage): ``(B, T, d)`` → ``(B, T, d)`` or logits."""
        for block in self.blocks:
            x = block(x)
        if self.is_last:
            x = self.logits(x)  # (B, T, V)
        return x

    def forward(self, x):
        if self.is_first:
            x = self.embed(x)
        return self.body(x)

    def extra_repr(self):
        return f"stage {self.index}/{self.n_stages}, blocks {self.block_range[0]}..{self.block_range[1] - 1}"


def split_transformer(model, n_stages, *, layers_per_stage=None):
    """Cut ``model`` (an ``effedu.model.Transformer``) into ``n_stages`` consecutive :class:`TransformerStage` s.

    Blocks are spread as evenly as possible (the first stages get one more when they do not divide), or as
    ``layers_per_stage`` says (a list of positive ints summing to ``n_layers``). Composing the stages in order
    computes ``model(tokens)`` exactly; their parameters are the model's own.
    """
    where = "split_transformer"
    if not isinstance(model, Transformer):
        raise TypeError(f"{where}: model must be an effedu.model.Transformer, got {type(model).__name__}")
    K = check_int(n_stages, "n_stages", where)
    L = len(model.blocks)
    if K > L:
        raise ValueError(f"{where}: n_stages={K} is larger than the model's n_layers={L} (each stage needs ≥ 1 block)")
    if layers_per_stage is None:
        q, r = divmod(L, K)
        layers_per_stage = [q + 1 if s < r else q for s in range(K)]
    else:
        if (not isinstance(layers_per_stage, (list, tuple)) or len(layers_per_stage) != K
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers_per_stage)
                or sum(layers_per_stage) != L):
            raise ValueError(
                f"{where}: layers_per_stage must be {K} positive ints summing to n_layers={L}, got {layers_per_stage!r}"
            )
    stages, start = [], 0
    for s, n in enumerate(layers_per_stage):
        stages.append(TransformerStage(model, start, start + n, index=s, n_stages=K))
        start += n
    return stages


def _owned_parameter_names(model, stage):
    """Names (in ``model``) of the parameters that live on ``stage``."""
    mine = {id(p) for p in stage.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in mine]


# --------------------------------------------------------------------------------------------------------------
# 3. running a stage: one code path for the simulation (one process) and the real pipeline (K processes)
# --------------------------------------------------------------------------------------------------------------


class _PeakTracker(SavedTensorTracker):
    """The course's saved-tensor meter, also remembering the highest live byte count it ever saw."""

    def __init__(self, exclude_ptrs=()):
        super().__init__(exclude_ptrs)
        self.peak = 0

    def pack(self, t):
        held = super().pack(t)
        self.peak = max(self.peak, self.live_bytes)
        return held


class _LocalChannel:
    """Messages between stages inside one process: a mailbox. A received tensor is a copy, as over a wire."""

    def __init__(self):
        self.mailbox = {}
        self.sent_bytes = 0

    def send(self, tensor, dst, tag):
        self.mailbox[(dst, tag)] = tensor.detach().clone()
        self.sent_bytes += tensor.numel() * tensor.element_size()

    def recv(self, shape, dtype, src, dst, tag):
        try:
            return self.mailbox.pop((dst, tag))
        except KeyError:
            raise RuntimeError(f"simulate_pipeline: stage {dst} waits for message {tag} from stage {src} that was "
                               f"never sent: the schedule runs an action before its input exists") from None

    def flush(self):
        pass


class _DistChannel:
    """Messages between processes: ``torch.distributed`` point-to-point (here gloo on the CPU)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.pending = []
        self.sent_bytes = 0

    def send(self, tensor, dst, tag):
        tensor = tensor.detach().contiguous()
        # asynchronous: the stage goes on computing while the message travels
        self.pending.append((self.dist.isend(tensor, dst, tag=tag), tensor))
        self.sent_bytes += tensor.numel() * tensor.element_size()

    def recv(self, shape, dtype, src, dst, tag):
        buf = torch.empty(shape, dtype=dtype)
        self.dist.recv(buf, src, tag=tag)  # blocks until the message arrives: this wait is the bubble
        return buf

    def flush(self):
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class StageRunner:
    """Runs one stage's actions (``("F", m)`` / ``("B", m)``) in order, on micro-batches, through a channel."""

    def __init__(self, stage, micro, weights, *, remat, loss_fn, channel, clock=time.perf_counter, t0=None):
        self.stage, self.micro, self.weights = stage, micro, weights
        self.remat, self.loss_fn, self.channel, self.clock = remat, loss_fn, channel, clock
        self.M = len(micro)
        self.tracker = _PeakTracker(parameter_storages(stage))
        self.dtype = next(stage.parameters()).dtype
        self.saved = {}  # micro → (stage input, stage output or weighted loss) held until its backward
        self.events, self.trace, self.losses = [], [], {}
        # times are taken from one system-wide monotonic clock, so the stages' events line up across processes
        self.t0 = clock() if t0 is None else t0

    def _boundary_shape(self, m):
        # the activation between two stages: (B_m, T, d)
        x_m = self.micro[m][0]
        return (x_m.shape[0], x_m.shape[1], self.stage.d_model)

    def forward(self, m):
        s = self.stage.index
        if self.stage.is_first:
            x_in = self.micro[m][0]  # token ids (B_m, T)
        else:
            x_in = self.channel.recv(self._boundary_shape(m), self.dtype, s - 1, s, tag=m).requires_grad_()
        start = self.clock()
        with self.tracker.hooks():
            h = self.stage.embed(x_in) if self.stage.is_first else x_in
            if self.remat:
                # GPipe's rematerialisation: keep only the stage input, recompute the rest in backward
                out = checkpoint(self.stage.body, h)
            else:
                out = self.stage.body(h)
            if self.stage.is_last:
                if self.weights[m] == 0.0:
                    out = out.sum() * 0.0  # nothing scored in this micro-batch: zero gradient, not 0/0 = NaN
                else:
                    # this micro-batch's share of the full-batch loss: wₘ · Lₘ
                    out = self.loss_fn(out, self.micro[m][1]) * self.weights[m]
                self.losses[m] = float(out.detach())
        end = self.clock()  # the box on the Gantt chart is the computation; the send is communication
        if not self.stage.is_last:
            self.channel.send(out, s + 1, tag=m)
        self.saved[m] = (x_in, out)
        self._record("F", m, start, end)

    def backward(self, m):
        s = self.stage.index
        x_in, out = self.saved.pop(m)
        if self.stage.is_last:
            grad_out = None  # out is the (scalar) weighted loss
        else:
            grad_out = self.channel.recv(out.shape, self.dtype, s + 1, s, tag=self.M + m)
        start = self.clock()
        with self.tracker.hooks():  # a rematerialising stage saves tensors again while it recomputes
            torch.autograd.backward(out, grad_out)  # parameter gradients accumulate in .grad
        end = self.clock()
        if not self.stage.is_first:
            self.channel.send(x_in.grad, s - 1, tag=self.M + m)  # ∂L/∂(stage input) goes back upstream
        del x_in, out
        self._record("B", m, start, end)

    def _record(self, kind, m, start, end):
        self.events.append({"stage": self.stage.index, "kind": kind, "micro": m,
                            "start": start - self.t0, "end": end - self.t0})
        self.trace.append(self.tracker.live_bytes)

    def run(self, actions):
        for kind, m in actions:
            (self.forward if kind == "F" else self.backward)(m)
        self.channel.flush()


def _prepare(where, model, batch, n_micro, n_stages, remat, schedule, weight_by, allow_uneven):
    if not isinstance(model, Transformer):
        raise TypeError(f"{where}: model must be an effedu.model.Transformer, got {type(model).__name__}")
    inputs, targets = check_batch(batch, where)
    if inputs.dim() != 2 or targets.shape != inputs.shape:
        raise ValueError(f"{where}: batch inputs and targets must both be (B, T) token ids, got "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    if not isinstance(remat, bool):
        raise TypeError(f"{where}: remat must be a bool, got {type(remat).__name__}")
    micro, weights = _micro_batches((inputs, targets), n_micro, weight_by, allow_uneven, where)
    if schedule is None:
        schedule = gpipe_schedule(n_stages, n_micro)
    else:
        check_schedule(schedule, n_stages, n_micro)
    return micro, weights, schedule


def simulate_pipeline(model, batch, n_micro, n_stages, *, remat=False, schedule=None, loss_fn=None,
                      weight_by="scored", allow_uneven=True, zero_grad=True):
    """Run a pipeline schedule (GPipe by default) in *one* process, tick by tick, stage by stage.

    The same stage code as :func:`run_pipeline`, with a mailbox instead of the network. Parameter gradients land
    in ``model``'s ``.grad`` and equal the full-batch gradient. Returns a dict: ``loss``, ``events`` (in ticks),
    ``activation_peak_bytes`` (per stage: the most bytes held for backward at any moment, deterministic),
    ``activation_trace`` (per stage: bytes held after each of its actions), ``sent_bytes`` (per stage).
    """
    where = "simulate_pipeline"
    K = check_int(n_stages, "n_stages", where)
    micro, weights, schedule = _prepare(where, model, batch, n_micro, K, remat, schedule, weight_by, allow_uneven)
    loss_fn = _loss_or_default(loss_fn)
    if zero_grad:
        model.zero_grad(set_to_none=True)
    stages = split_transformer(model, K)
    channel = _LocalChannel()
    runners = [StageRunner(st, micro, weights, remat=remat, loss_fn=loss_fn, channel=channel) for st in stages]
    events, sent = [], [0] * K
    for t, tick in enumerate(schedule):
        for s, (kind, m) in tick.items():
            before = channel.sent_bytes
            runner = runners[s]
            (runner.forward if kind == "F" else runner.backward)(m)
            sent[s] += channel.sent_bytes - before
            events.append({"stage": s, "kind": kind, "micro": m, "start": t, "end": t + 1})
    return {
        "n_stages": K, "n_micro": len(micro), "remat": remat, "micro_sizes": [mb.inputs.shape[0] for mb in micro],
        "loss": sum(runners[-1].losses.values()),
        "events": events,
        "activation_peak_bytes": [r.tracker.peak for r in runners],
        "activation_trace": [r.trace for r in runners],
        "sent_bytes": sent,
    }


# --------------------------------------------------------------------------------------------------------------
# 4. the real pipeline: one process per stage, torch.distributed point-to-point
# --------------------------------------------------------------------------------------------------------------


def _init_worker(rank, world_size, store_path, spec):
    """Join the process group (``processes.init_gloo``: gloo, loopback only) and rebuild the model from ``spec``."""
    dist = init_gloo(rank, world_size, store_path, spec["timeout"], spec["threads"])
    model = Transformer(spec["config"]).to(spec["dtype"])
    model.load_state_dict(spec["state_dict"])
    model.train(spec["training"])
    return dist, model


def _pipeline_worker(rank, world_size, store_path, result_dir, spec):
    """One stage of :func:`run_pipelines` (runs in its own process)."""
    dist = None
    try:
        dist, model = _init_worker(rank, world_size, store_path, spec)
        stage = split_transformer(model, world_size, layers_per_stage=spec["layers_per_stage"])[rank]
        names = _owned_parameter_names(model, stage)
        inputs, targets = spec["inputs"], spec["targets"]
        results = []
        for i, run in enumerate(spec["runs"]):
            micro, weights = _micro_batches((inputs, targets), run["n_micro"], spec["weight_by"], spec["allow_uneven"],
                                            "run_pipelines")
            schedule = run["schedule"] or gpipe_schedule(world_size, run["n_micro"])
            model.zero_grad(set_to_none=True)
            channel = _DistChannel()
            dist.barrier()  # every stage starts its clock together
            runner = StageRunner(stage, micro, weights, remat=run["remat"], loss_fn=spec["loss_fn"], channel=channel,
                                  t0=0.0)  # absolute clock readings; the parent subtracts the first start
            runner.run(stage_actions(schedule, rank))
            dist.barrier()
            results.append({
                "events": runner.events,
                "activation_peak_bytes": runner.tracker.peak,
                "activation_trace": runner.trace,
                "sent_bytes": channel.sent_bytes,
                "loss": sum(runner.losses.values()) if stage.is_last else None,
                "grads": {n: (None if p.grad is None else p.grad.detach().clone())
                          for n, p in model.named_parameters() if n in set(names)},
            })
        write_result(result_dir, rank, {"results": results})
    except BaseException:
        write_result(result_dir, rank, {"error": traceback.format_exc()})
        raise
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def run_pipelines(model, batch, configs, *, n_stages=2, layers_per_stage=None, loss_fn=None,
                  weight_by="scored", allow_uneven=True, warmup=1, repeats=1, pick="best", threads=1, timeout=120.0):
    """Several pipeline runs in *one* launch of ``n_stages`` processes (spawning costs seconds; do it once).

    ``configs``: a list of dicts ``{"n_micro": M, "remat": bool, "schedule": None | a schedule}`` (remat and
    schedule optional; the default schedule is GPipe). First every config runs ``warmup`` times and those runs are
    dropped (first-run allocations and lazy initialisation would otherwise show up in the timings). Then the
    configs run in turn ``repeats`` times (interleaved: a burst of load from other programs hits every config, not
    one); for each config the run with the shortest step time is reported (``pick="best"``: other programs only
    ever *add* time, to the boxes and to the hand-offs, so the fastest run is the one closest to the pipeline
    itself), or the one with the median step time (``pick="median"``). Returns one result per config, as
    :func:`run_pipeline` describes, with ``step_times`` (all repeats, in seconds) added. ``loss_fn=None`` is the
    mean cross-entropy over scored tokens (``microbatch.token_cross_entropy``); another one must be picklable.
    """
    where = "run_pipelines"
    K = check_int(n_stages, "n_stages", where)
    if K < 2:
        raise ValueError(f"{where}: a pipeline needs a world size n_stages ≥ 2 (one process per stage), got {K}; "
                         f"for one process use accumulate_gradients or simulate_pipeline")
    if not isinstance(configs, (list, tuple)) or not configs:
        raise TypeError(f"{where}: configs must be a non-empty list of dicts {{'n_micro': M, 'remat': bool}}")
    check_int(warmup, "warmup", where, minimum=0)
    check_int(repeats, "repeats", where)
    check_int(threads, "threads", where)
    if pick not in ("best", "median"):
        raise ValueError(f"{where}: pick must be 'best' or 'median', got {pick!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
    loss_fn = _loss_or_default(loss_fn)
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable (and picklable: a module-level function)")
    runs, run_sizes = [], []
    for c in configs:
        if not isinstance(c, dict) or "n_micro" not in c or set(c) - {"n_micro", "remat", "schedule"}:
            raise TypeError(f"{where}: each config must be a dict with 'n_micro' (and optional 'remat', 'schedule'), got {c!r}")
        check_int(c["n_micro"], "n_micro", where)
        run = {"n_micro": c["n_micro"], "remat": c.get("remat", False), "schedule": c.get("schedule")}
        micro, _, _ = _prepare(where, model, batch, run["n_micro"], K, run["remat"], run["schedule"], weight_by,
                               allow_uneven)
        run_sizes.append([mb.inputs.shape[0] for mb in micro])
        runs.append(run)
    split_transformer(model, K, layers_per_stage=layers_per_stage)  # n_stages ≤ n_layers, layers_per_stage valid
    inputs, targets = batch
    spec = {
        "config": model.config, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtype": next(model.parameters()).dtype, "training": model.training,
        "inputs": inputs.detach().cpu(), "targets": targets.detach().cpu(), "runs": runs * (warmup + repeats),
        "layers_per_stage": layers_per_stage, "loss_fn": loss_fn, "weight_by": weight_by,
        "allow_uneven": allow_uneven, "threads": threads, "timeout": float(timeout),
    }
    payloads = launch(_pipeline_worker, where, K, spec, timeout)
    out = []
    for i, run in enumerate(runs):
        candidates = []
        for rep in range(repeats):
            per_rank = [p["results"][(warmup + rep) * len(runs) + i] for p in payloads]
            events = sorted((e for r in per_rank for e in r["events"]), key=lambda e: (e["start"], e["stage"]))
            first = events[0]["start"]
            events = [{**e, "start": e["start"] - first, "end": e["end"] - first} for e in events]
            candidates.append((max(e["end"] for e in events), rep, per_rank, events))
        ranked = sorted(candidates, key=lambda c: c[:2])
        _, _, per_rank, events = ranked[0 if pick == "best" else (repeats - 1) // 2]  # the fastest / the median run
        grads = {}
        for r in per_rank:
            grads.update(r["grads"])
        out.append({
            "n_stages": K, "n_micro": run["n_micro"], "remat": run["remat"],
            "micro_sizes": run_sizes[i],
            "loss": per_rank[-1]["loss"],
            "grads": {name: grads[name] for name, _ in model.named_parameters()},
            "events": events,
            "activation_peak_bytes": [r["activation_peak_bytes"] for r in per_rank],
            "activation_trace": [r["activation_trace"] for r in per_rank],
            "sent_bytes": [r["sent_bytes"] for r in per_rank],
            "wall_time": max(e["end"] for e in events) - min(e["start"] for e in events),
            "measured_bubble": measured_bubble(events, K),
            "predicted_bubble": bubble_fraction(K, run["n_micro"]),
            "step_times": [c[0] for c in candidates],
        })
    return out


def run_pipeline(model, batch, n_micro, *, n_stages=2, remat=False, schedule=None, **kwargs):
    """A real pipeline: ``model`` cut into ``n_stages`` stages, one *process* each, on this machine.

    Each process rebuilds the model from its config and weights and keeps its stage. Stages talk through
    ``torch.distributed`` (gloo backend, rendezvous through a file in a temporary directory, loopback only):
    activations go forward with ``send``/``recv``, gradients with respect to them come back. The schedule is
    GPipe's (or ``schedule``). With ``remat=True`` every stage rematerialises its activations (chapter 02's
    ``checkpoint``). Processes are started with ``torch.multiprocessing`` (spawn), joined, and terminated on error
    or after ``timeout`` seconds. With dropout, each process draws its own masks, so only a model without dropout
    (or in eval mode) reproduces the single-process gradient exactly. From a script, call it under ``if __name__ == "__main__":`` (spawn re-imports the
    main module in every child); pytest and notebooks need nothing.

    Returns a dict: ``loss``; ``grads`` ``{parameter name: gradient}`` (equal to the single-process gradient);
    ``events`` (``{"stage", "kind": "F"|"B", "micro", "start", "end"}`` in seconds, for a measured Gantt chart:
    each box is the computation; waiting for a message and sending one are the gaps between boxes);
    ``activation_peak_bytes`` and ``activation_trace`` per stage; ``sent_bytes`` per stage; ``wall_time``;
    ``measured_bubble`` and ``predicted_bubble``. Other keywords: see :func:`run_pipelines`.
    """
    return run_pipelines(model, batch, [{"n_micro": n_micro, "remat": remat, "schedule": schedule}],
                         n_stages=n_stages, **kwargs)[0]


# --------------------------------------------------------------------------------------------------------------
# 5. the oracle: torch.distributed.pipelining (production); never used by the implementation above
# --------------------------------------------------------------------------------------------------------------


class _WeightedTokenLoss:
    """Σ over a micro-batch's scored tokens of the cross-entropy / N (N = scored tokens of the whole batch)."""

    def __init__(self, n_scored):
        self.n_scored = n_scored

    def __call__(self, logits, targets):
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                               reduction="sum") / self.n_scored


def _torch_pipeline_worker(rank, world_size, store_path, result_dir, spec):
    dist = None
    try:
        dist, model = _init_worker(rank, world_size, store_path, spec)
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        stage_module = split_transformer(model, world_size)[rank]
        names = _owned_parameter_names(model, stage_module)
        inputs, targets = spec["inputs"], spec["targets"]
        stage = PipelineStage(stage_module, rank, world_size, torch.device("cpu"))
        # scale_grads=False: each micro-batch's loss is already its share of the full-batch mean
        schedule = ScheduleGPipe(stage, n_microbatches=spec["n_micro"],
                                 loss_fn=_WeightedTokenLoss(int((targets != IGNORE).sum())), scale_grads=False)
        for _ in range(spec["warmup"] + 1):  # warm-up steps first (first-run costs), then the measured one
            model.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            losses = []
            if rank == 0:
                schedule.step(inputs)
            elif rank == world_size - 1:
                schedule.step(target=targets, losses=losses)
            else:
                schedule.step()
            elapsed = time.perf_counter() - start
            dist.barrier()
        write_result(result_dir, rank, {"results": [{
            "time": elapsed,
            "loss": float(sum(l.detach() for l in losses)) if losses else None,
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in set(names) and p.grad is not None},
        }]})
    except BaseException:
        write_result(result_dir, rank, {"error": traceback.format_exc()})
        raise
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def run_torch_pipeline(model, batch, n_micro, *, n_stages=2, warmup=0, threads=1, timeout=120.0):
    """The production path, as an oracle: the same stages run by ``torch.distributed.pipelining.ScheduleGPipe``.

    Same processes and rendezvous as :func:`run_pipeline`; ``warmup`` untimed steps come first. Returns ``{"loss",
    "grads", "time"}`` (time: the slowest stage's time for the step, seconds). Micro-batches must have equal sizes
    (``n_micro`` divides the batch).
    """
    where = "run_torch_pipeline"
    K = check_int(n_stages, "n_stages", where)
    check_int(warmup, "warmup", where, minimum=0)
    if K < 2:
        raise ValueError(f"{where}: a pipeline needs a world size n_stages ≥ 2, got {K}")
    _prepare(where, model, batch, n_micro, K, False, None, "scored", False)
    split_transformer(model, K)
    inputs, targets = batch
    spec = {
        "config": model.config, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtype": next(model.parameters()).dtype, "training": model.training,
        "inputs": inputs.detach().cpu(), "targets": targets.detach().cpu(), "n_micro": n_micro, "warmup": warmup,
        "threads": threads, "timeout": float(timeout),
    }
    payloads = launch(_torch_pipeline_worker, where, K, spec, timeout)
    per_rank = [p["results"][0] for p in payloads]
    grads = {}
    for r in per_rank:
        grads.update(r["grads"])
    return {"loss": per_rank[-1]["loss"], "grads": grads, "time": max(r["time"] for r in per_rank)}


__all__ = [
    "gpipe_schedule", "check_schedule", "stage_actions", "idle_fraction", "bubble_fraction", "schedule_events",
    "measured_bubble", "busy_fractions", "handoff_latencies", "ideal_step_time",
    "TransformerStage", "split_transformer", "StageRunner", "simulate_pipeline", "run_pipelines", "run_pipeline",
    "run_torch_pipeline",
]
