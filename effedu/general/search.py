"""Architecture search (survey §3.11): let an algorithm pick the layers, widths, heads and attention of a Transformer.

The survey's two examples, both here from scratch on effedu's own :class:`~effedu.model.Transformer`:

* **The Evolved Transformer** (So, Liang & Le 2019, "The Evolved Transformer") searches with *tournament
  selection* (Real et al. 2019, "Regularized Evolution for Image Classifier Architecture Search"): keep a
  population of P trained architectures; to make a child, draw ``tournament`` members at random, take the fittest
  as the parent, **mutate one gene**, train and evaluate the child, add it and retire the *oldest* member (aging
  keeps the search from clinging to one lucky early model)::

      population ← P random architectures, each trained and evaluated          (generation 0)
      repeat:  parent = argmin_{a ∈ sample(population, t)} fitness(a)
               child  = mutate(parent);  train(child);  population ← population[1:] + [child]

* **Progressive dynamic hurdles** (So et al. 2019, §3.2): most children are bad, and it shows early. Train every
  child a first budget s₀; only a child whose fitness *beats the hurdle* — the mean fitness at that stage of the
  population — trains on to s₁, then faces the next hurdle, and so on. Compute goes to the promising children::

      budgets s₀ < s₁ < … < s_K (cumulative steps);   hurdle h_i = mean{ f_i(a) : a in the population reached i }
      child: train to s₀ → f₀;  for i = 0 … K−1:  if f_i < h_i: train on to s_{i+1} → f_{i+1}  else stop
      steps spent by a child = the last budget it reached;  total = Σ over children (exact, counted here)

  With ``hurdles=None`` every child trains the same ``steps``: plain tournament selection (a one-stage schedule
  ``hurdles=(s,)`` is exactly that, with ``steps=s``).

* **HAT** (Wang et al. 2020, "Hardware-Aware Transformers") adds the *latency measured on the target device* to
  the objective. We measure latency on this CPU and *report* it beside the deterministic costs (parameters,
  FLOPs from :func:`effedu.measure.training_flops`), but selection never reads it: a timing changes from run to run,
  and "same seed, same result" is worth more in a course than a noisy objective. The trade-off is then read off
  the **Pareto front** (:func:`pareto_front`): the architectures no other one beats on every objective at once.

Fitness is *lower is better* (a validation loss). Every random choice comes from one ``random.Random(seed)``, so a
search is a pure function of its inputs: the same seed gives the same children, in the same order, and the same
best architecture (the tests hold it to that).

Training a child (:func:`train_and_eval`, :class:`TrainedFitness`) uses :func:`effedu.train.train` on a small
synthetic task; it is **resumable by continuing**: a child that passes a hurdle keeps its model *and its AdamW
state* and trains on with the next batches at a constant learning rate, so training 20 steps and then 40 more
gives exactly the model trained 60 steps in one go (tested bit for bit on the CPU).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .._checks import check_choice, check_int, check_seed
from ..attention import available as available_attention
from ..data.tasks import make_task, task_vocab_size
from ..measure import count_parameters, time_it, training_flops
from ..model import Transformer, TransformerConfig
from ..train import default_step, evaluate, train
from .sharing import SHARE_MODES, share_layers

GENES = ("n_layers", "d_model", "n_heads", "d_ff", "attention", "share")
# keyword arguments of the attention variants that need one to differ from dense attention on short sequences
ATTENTION_KWARGS = {"local": {"window": 4}, "strided": {"stride": 4}, "fixed": {"stride": 4},
                    "linformer": {"rank": 4}, "nystrom": {"landmarks": 4}}


# --------------------------------------------------------------------------------------------------------------
# The search space: a genome of six genes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """One architecture: a point of a :class:`SearchSpace` (frozen, hashable: usable as a dict key).

    ``share``: ``None`` (or ``"none"``) for separate layers, ``"all"`` / ``"attention"`` / ``"ffn"`` for chapter 04's
    ALBERT-style cross-layer sharing (:func:`effedu.general.sharing.share_layers`)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    attention: str = "dense"
    share: Optional[str] = None

    def config(self, vocab_size, *, max_len=64, causal=True, attention_kwargs=None, **overrides):
        """The :class:`~effedu.model.TransformerConfig` of this architecture. ``attention_kwargs`` default: the
        module's :data:`ATTENTION_KWARGS` for this variant (a small window/rank so that it differs from dense)."""
        kw = dict(ATTENTION_KWARGS.get(self.attention, {}) if attention_kwargs is None else attention_kwargs)
        return TransformerConfig(vocab_size=vocab_size, d_model=self.d_model, n_heads=self.n_heads,
                                 n_layers=self.n_layers, d_ff=self.d_ff, max_len=max_len, causal=causal,
                                 attention=self.attention, attention_kwargs=kw, **overrides)

    def build(self, vocab_size, *, seed=0, **config_kw):
        """A freshly initialised :class:`~effedu.model.Transformer` (``torch.manual_seed(seed)`` first), with the
        layers shared as ``share`` says."""
        check_seed(seed, "Arch.build")
        torch.manual_seed(seed)
        model = Transformer(self.config(vocab_size, **config_kw))
        if self.share not in (None, "none"):
            share_layers(model, self.share)
        return model

    def label(self):
        """A short readable name: ``L2 d64 h4 ff128 dense`` (+ ``share=all``)."""
        s = f"L{self.n_layers} d{self.d_model} h{self.n_heads} ff{self.d_ff} {self.attention}"
        return s + (f" share={self.share}" if self.share not in (None, "none") else "")


def _choices(values, name, kind):
    where = "SearchSpace"
    if isinstance(values, (str, int)) or values is None:
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{where}: {name} must be a sequence of choices, got {type(values).__name__}") from None
    if not values:
        raise ValueError(f"{where}: {name} must offer at least one choice, got an empty list")
    if len(set(values)) != len(values):
        raise ValueError(f"{where}: {name} has repeated choices {values!r}")
    for v in values:
        if kind == "int":
            check_int(v, name, where)
        elif kind == "attention":
            if not isinstance(v, str):
                raise TypeError(f"{where}: attention choices must be registered names (str), got {v!r}")
            check_choice(v, available_attention(), "attention", where)
        elif v is not None:  # share
            check_choice(v, SHARE_MODES, "share", where)
    return values


class SearchSpace:
    """Every combination of the choices, minus the invalid ones (``d_model`` not divisible by ``n_heads``) and the
    redundant ones (a 1-layer model with its layers "shared": the same model as unshared, when the space has both).

    ``.size`` counts the valid architectures, ``.archs()`` lists them (in a fixed order), ``.sample(rng)`` draws one
    uniformly, ``.mutate(arch, rng)`` changes one gene, ``.validate(arch)`` raises on an architecture outside.
    ``rng`` is a ``random.Random`` (or an int seed)."""

    def __init__(self, n_layers=(1, 2, 3), d_model=(32, 64), n_heads=(1, 2, 4), d_ff=(64, 128),
                 attention=("dense",), share=(None,)):
        self.choices = {
            "n_layers": _choices(n_layers, "n_layers", "int"),
            "d_model": _choices(d_model, "d_model", "int"),
            "n_heads": _choices(n_heads, "n_heads", "int"),
            "d_ff": _choices(d_ff, "d_ff", "int"),
            "attention": _choices(attention, "attention", "attention"),
            "share": _choices(share, "share", "share"),
        }
        # the "no sharing" choice, if the space offers one: a 1-layer model shares nothing, so a 1-layer
        # architecture with share="all" is the same model as the unshared one and is left out (repaired to this)
        self.plain_share = next((v for v in (None, "none") if v in self.choices["share"]), "absent")
        self._archs = tuple(Arch(*genes) for genes in itertools.product(*(self.choices[g] for g in GENES))
                            if genes[1] % genes[2] == 0 and not self._redundant(genes[0], genes[5]))
        if not self._archs:
            raise ValueError(f"SearchSpace: no valid architecture: no d_model in {self.choices['d_model']} is "
                             f"divisible by any n_heads in {self.choices['n_heads']}")

    def _redundant(self, n_layers, share):
        return n_layers == 1 and share not in (None, "none") and self.plain_share != "absent"

    @property
    def size(self):
        """Number of valid architectures."""
        return len(self._archs)

    def archs(self):
        """Every valid architecture, in the order of the choices (n_layers varies slowest)."""
        return list(self._archs)

    def __contains__(self, arch):
        return arch in set(self._archs)

    def __repr__(self):
        return "SearchSpace(" + ", ".join(f"{g}={self.choices[g]!r}" for g in GENES) + f")  # {self.size} valid"

    def validate(self, arch):
        """``arch`` if it is a valid point of this space; a ValueError saying which gene is off otherwise."""
        if not isinstance(arch, Arch):
            raise TypeError(f"SearchSpace.validate: expected an Arch, got {type(arch).__name__}")
        for g in GENES:
            if getattr(arch, g) not in self.choices[g]:
                raise ValueError(f"SearchSpace.validate: {g}={getattr(arch, g)!r} is not one of {self.choices[g]!r}")
        if arch.d_model % arch.n_heads:
            raise ValueError(f"SearchSpace.validate: d_model={arch.d_model} is not divisible by "
                             f"n_heads={arch.n_heads}")
        if self._redundant(arch.n_layers, arch.share):
            raise ValueError(f"SearchSpace.validate: share={arch.share!r} with n_layers=1 is the unshared model "
                             f"(share={self.plain_share!r}): left out of the space")
        return arch

    def sample(self, rng):
        """One architecture drawn uniformly from the valid ones."""
        return _rng(rng, "SearchSpace.sample").choice(self._archs)

    def repair(self, arch):
        """``arch`` made valid, deterministically: ``n_heads`` made to divide ``d_model`` (the largest allowed head
        count ≤ the current one that divides d_model, else the smallest one that does), and a 1-layer model's
        ``share`` set to the space's no-sharing choice. Other genes are kept."""
        if self._redundant(arch.n_layers, arch.share):
            arch = _replace(arch, share=self.plain_share)
        if arch.d_model % arch.n_heads == 0:
            return arch
        fits = sorted(h for h in self.choices["n_heads"] if arch.d_model % h == 0)
        if not fits:
            raise ValueError(f"SearchSpace.repair: no n_heads in {self.choices['n_heads']} divides "
                             f"d_model={arch.d_model}")
        below = [h for h in fits if h <= arch.n_heads]
        return _replace(arch, n_heads=below[-1] if below else fits[0])

    def mutate(self, arch, rng):
        """A copy of ``arch`` with **one gene** changed to another allowed value (So et al.'s mutation), chosen
        uniformly among the genes that have another value leading to a valid architecture; a change of
        ``d_model`` that ``n_heads`` does not divide, or of ``n_layers`` to 1 with layers shared, is repaired
        (:meth:`repair`). A space with a single valid
        architecture returns it unchanged."""
        rng = _rng(rng, "SearchSpace.mutate")
        self.validate(arch)
        options = {}
        for g in GENES:
            alts = []
            for v in self.choices[g]:
                if v == getattr(arch, g):
                    continue
                if g == "n_heads" and arch.d_model % v:
                    continue  # this head count never fits the current width
                if g == "d_model" and not any(v % h == 0 for h in self.choices["n_heads"]):
                    continue
                if g == "share" and self._redundant(arch.n_layers, v):
                    continue  # sharing the one layer of a 1-layer model changes nothing
                alts.append(v)
            if alts:
                options[g] = alts
        if not options:
            return arch
        gene = rng.choice([g for g in GENES if g in options])
        return self.repair(_replace(arch, **{gene: rng.choice(options[gene])}))


def _replace(arch, **changes):
    return Arch(**{**asdict(arch), **changes})


def _rng(rng, where):
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"{where}: rng must be a random.Random or an int seed, got {type(rng).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Pareto front
# --------------------------------------------------------------------------------------------------------------


def _objective_values(point, objectives):
    out = []
    for o in objectives:
        if callable(o):
            out.append(float(o(point)))
        elif isinstance(point, dict):
            out.append(float(point[o]))
        else:
            out.append(float(getattr(point, o)))
    return out


def dominates(a, b):
    """True when objective vector ``a`` is ≤ ``b`` everywhere and < somewhere (all objectives minimised)."""
    if len(a) != len(b):
        raise ValueError(f"dominates: the vectors must have the same length, got {len(a)} and {len(b)}")
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points, objectives):
    """The points that no other point dominates, in their input order (every objective **minimised**).

    ``points``: dicts or objects; ``objectives``: keys/attribute names, or callables ``point -> number`` (to
    maximise an accuracy, minimise ``lambda p: -p["accuracy"]``). Two points with equal objectives do not dominate
    each other: both stay. O(n²), fine for a population."""
    if isinstance(objectives, str) or not isinstance(objectives, (list, tuple)) or not objectives:
        raise ValueError(f"pareto_front: objectives must be a non-empty list of names or callables, got {objectives!r}")
    points = list(points)
    values = [_objective_values(p, objectives) for p in points]
    if any(math.isnan(v) for vs in values for v in vs):
        raise ValueError("pareto_front: an objective is NaN (measure it, or leave that point out)")
    # p is on the front ⇔ ∄ q: q ≤ p in every objective and q < p in one
    return [p for p, vp in zip(points, values) if not any(dominates(vq, vp) for vq in values)]


# --------------------------------------------------------------------------------------------------------------
# Evolution with tournament selection and progressive dynamic hurdles
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One evaluated child. ``budgets``: the cumulative steps it was trained to, one per stage it reached;
    ``fitnesses``: its fitness after each of them; ``steps`` = ``budgets[-1]``, ``fitness`` = ``fitnesses[-1]``;
    ``hurdles``: the hurdle it faced after each stage but the last budget (None: no population at that stage yet).
    ``cost``: deterministic costs (``params``, ``flops``) from ``cost_fn``; ``latency``: seconds from
    ``latency_fn`` (reported, never selected on)."""

    index: int
    arch: Arch
    generation: int
    parent: Optional[int]
    budgets: list
    fitnesses: list
    hurdles: list = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    latency: Optional[float] = None

    @property
    def steps(self):
        return self.budgets[-1]

    @property
    def fitness(self):
        return self.fitnesses[-1]

    @property
    def stage(self):
        """How many hurdles it passed (0 = trained the first budget only)."""
        return len(self.budgets) - 1

    def as_dict(self):
        d = {"index": self.index, "arch": asdict(self.arch), "label": self.arch.label(), "generation": self.generation,
             "parent": self.parent, "budgets": list(self.budgets), "fitnesses": list(self.fitnesses),
             "hurdles": list(self.hurdles), "steps": self.steps, "fitness": self.fitness, "latency": self.latency}
        d.update(self.cost)
        return d


@dataclass
class SearchResult:
    """Every evaluated child (``children``, in evaluation order), the schedule, the exact step count."""

    children: list
    budgets: tuple
    population: int
    generations: int
    tournament: int
    seed: int
    hurdles_on: bool
    final_population: list

    @property
    def total_steps(self):
        """Σ over children of the steps each trained (the last budget it reached): exact."""
        return sum(c.steps for c in self.children)

    @property
    def best(self):
        """The fittest child among those trained the full budget (first one on ties)."""
        full = [c for c in self.children if c.steps == self.budgets[-1]]
        return min(full or self.children, key=lambda c: c.fitness)

    def by_generation(self):
        """``{generation: [children]}``."""
        out = {}
        for c in self.children:
            out.setdefault(c.generation, []).append(c)
        return out

    def pareto_front(self, objectives=("fitness", "params"), *, full_budget_only=True):
        """:func:`pareto_front` of the children (of those trained the full budget, by default: a fitness after a
        shorter budget is not comparable). Objectives: ``"fitness"``, ``"steps"``, ``"latency"`` or a cost key."""
        pts = [c for c in self.children if c.steps == self.budgets[-1] or not full_budget_only]

        def getter(name):
            return name if callable(name) else (lambda c: getattr(c, name) if name in ("fitness", "steps", "latency")
                                                 else c.cost[name])
        return pareto_front(pts, [getter(o) for o in objectives])

    def as_dict(self):
        return {"budgets": list(self.budgets), "population": self.population, "generations": self.generations,
                "tournament": self.tournament, "seed": self.seed, "hurdles_on": self.hurdles_on,
                "total_steps": self.total_steps, "best": self.best.index,
                "children": [c.as_dict() for c in self.children]}


def _check_budgets(hurdles, steps, where):
    if hurdles is None:
        check_int(steps, "steps", where)
        return (steps,), False
    if isinstance(hurdles, (str, bytes)) or not isinstance(hurdles, (list, tuple)) or not hurdles:
        raise ValueError(f"{where}: hurdles must be a non-empty list of cumulative step budgets (or None), "
                         f"got {hurdles!r}")
    for h in hurdles:
        check_int(h, "hurdles", where)
    if any(b <= a for a, b in zip(hurdles, hurdles[1:])):
        raise ValueError(f"{where}: hurdles must be increasing cumulative budgets, got {tuple(hurdles)}")
    return tuple(hurdles), True


def tournament_select(population, k, rng):
    """So et al.'s / Real et al.'s selection: ``k`` distinct members drawn at random, the fittest (lowest
    fitness; the earliest drawn on ties) wins. ``population``: a list of :class:`Child`."""
    check_int(k, "tournament", "tournament_select")
    contestants = rng.sample(population, min(k, len(population)))
    return min(contestants, key=lambda c: c.fitness)


def hurdle_at(population, stage):
    """The running hurdle of ``stage``: the mean fitness after budget ``stage`` of the population's members that
    reached it (None when none did: the first to get there passes)."""
    vals = [c.fitnesses[stage] for c in population if len(c.fitnesses) > stage]
    return sum(vals) / len(vals) if vals else None


def evolve(space, fitness_fn, *, population=8, generations=4, tournament=3, seed=0, hurdles=None, steps=100,
           cost_fn=None, latency_fn=None):
    """Tournament-selection evolution over ``space`` with optional progressive dynamic hurdles.

    ``fitness_fn(arch, steps) -> float`` (lower is better): the fitness after training to ``steps`` cumulative
    steps; it must be a deterministic function of its arguments (:class:`TrainedFitness` is, and continues a
    child's training instead of restarting it). Generation 0 is ``population`` random architectures; each of the
    next ``generations − 1`` generations adds ``population`` children, each a one-gene mutation of a tournament
    winner, the oldest member retiring as each child joins (regularised evolution).

    ``hurdles=None``: every child trains ``steps`` steps. ``hurdles=(s₀, s₁, …)`` (increasing cumulative budgets):
    every child trains s₀; it trains on to s_{i+1} only while its fitness is *strictly below* the hurdle h_i =
    :func:`hurdle_at` (population, i) of the population it is about to join. ``cost_fn(arch) -> dict`` of
    deterministic costs and ``latency_fn(arch) -> seconds`` are recorded per child; selection reads only the fitness.
    """
    where = "evolve"
    if not isinstance(space, SearchSpace):
        raise TypeError(f"{where}: space must be a SearchSpace, got {type(space).__name__}")
    if not callable(fitness_fn):
        raise TypeError(f"{where}: fitness_fn must be callable (arch, steps) -> float, got {type(fitness_fn).__name__}")
    check_int(population, "population", where)
    if population < 2:
        raise ValueError(f"{where}: population must be ≥ 2 (a tournament needs someone to lose), got {population}")
    check_int(generations, "generations", where)
    check_int(tournament, "tournament", where)
    check_seed(seed, where)
    budgets, hurdles_on = _check_budgets(hurdles, steps, where)
    rng = random.Random(seed)
    children, alive = [], []

    def evaluate_child(arch, generation, parent):
        child = Child(index=len(children), arch=arch, generation=generation, parent=parent, budgets=[], fitnesses=[])
        for stage, budget in enumerate(budgets):
            if stage > 0:
                h = hurdle_at(alive, stage - 1)
                child.hurdles.append(h)
                if h is not None and not child.fitnesses[-1] < h:
                    break  # failed hurdle stage − 1: no more training
            f = float(fitness_fn(arch, budget))
            if math.isnan(f):
                raise ValueError(f"{where}: fitness_fn returned NaN for {arch.label()} at {budget} steps")
            child.budgets.append(budget)
            child.fitnesses.append(f)
        if cost_fn is not None:
            child.cost = dict(cost_fn(arch))
        if latency_fn is not None:
            child.latency = float(latency_fn(arch))
        children.append(child)
        return child

    for _ in range(population):  # generation 0: random architectures
        alive.append(evaluate_child(space.sample(rng), 0, None))
    for generation in range(1, generations):
        for _ in range(population):
            parent = tournament_select(alive, tournament, rng)
            child = evaluate_child(space.mutate(parent.arch, rng), generation, parent.index)
            alive = alive[1:] + [child]  # the oldest retires (aging)
    return SearchResult(children=children, budgets=budgets, population=population, generations=generations,
                        tournament=tournament, seed=seed, hurdles_on=hurdles_on, final_population=list(alive))


# --------------------------------------------------------------------------------------------------------------
# Fitness by training: a small task, a resumable trainer, costs and latency
# --------------------------------------------------------------------------------------------------------------

TASK = {"name": "sort", "seq_len": 13, "batch": 32, "val_samples": 256, "val_seed": 10**6, "lr": 3e-3}


def task_batch(step, *, seed=0, task=None):
    """Training batch ``step`` of the search's task (:data:`TASK`: sorting, ``effedu.data``): seeded by the step, so
    a continued run sees exactly the batches a run from scratch would."""
    t = {**TASK, **(task or {})}
    return make_task(t["name"], t["batch"], t["seq_len"], seed=seed * 10**7 + step)


def val_batch(*, task=None):
    t = {**TASK, **(task or {})}
    return make_task(t["name"], t["val_samples"], t["seq_len"], seed=t["val_seed"])


@dataclass
class TrainState:
    """A child's training so far: its model, its AdamW optimiser (moments included) and the steps done."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    steps: int = 0


def train_and_eval(arch, steps, *, state=None, task=None, seed=0, lr=None, grad_clip=1.0, return_state=False):
    """Train ``arch`` to ``steps`` cumulative steps on the search's task and return its validation loss.

    Resumable **by continuing**: pass the ``state`` returned earlier (``return_state=True`` gives
    ``(val_loss, state)``) and only ``steps − state.steps`` more steps run, on batches ``state.steps …`` with the
    same AdamW (its moments kept) at a constant learning rate — exactly the model a run from scratch to ``steps``
    gives. Uses :func:`effedu.train.train` (``progress=False``) with a step that drives the kept optimiser."""
    where = "train_and_eval"
    if not isinstance(arch, Arch):
        raise TypeError(f"{where}: arch must be an Arch, got {type(arch).__name__}")
    check_int(steps, "steps", where, minimum=0)
    t = {**TASK, **(task or {})}
    lr = t["lr"] if lr is None else lr
    if state is None:
        model = arch.build(task_vocab_size(t["name"]), seed=seed, max_len=t["seq_len"])
        state = TrainState(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01))
    if steps < state.steps:
        raise ValueError(f"{where}: steps={steps} is below the {state.steps} steps already trained (continue only)")
    extra, start = steps - state.steps, state.steps
    if extra:
        def step_fn(model, inputs, targets, _optimizer):  # train()'s own optimiser is not used: ours keeps its state
            return default_step(model, inputs, targets, state.optimizer, grad_clip)

        train(state.model, lambda i: task_batch(start + i, seed=seed, task=t), steps=extra, lr=lr, seed=seed,
              step_fn=step_fn, progress=False)
        state.steps = steps
    loss, _ = evaluate(state.model, val_batch(task=t))
    return (loss, state) if return_state else loss


class TrainedFitness:
    """``fitness_fn`` for :func:`evolve`: ``f(arch, steps)`` = validation loss of ``arch`` trained ``steps`` steps.

    Keeps the training state of every architecture it trained, so a hurdle's next budget *continues* training
    (``train_and_eval(state=...)``); the value is memoised per ``(arch, steps)`` (a duplicate child reuses it:
    ``steps_trained`` counts the steps actually run, ≤ the search's ``total_steps``). A lower budget than one
    already reached for that architecture retrains from scratch."""

    def __init__(self, *, task=None, seed=0, lr=None):
        self.task, self.seed, self.lr = task, seed, lr
        self.states, self.values, self.steps_trained = {}, {}, 0

    def __call__(self, arch, steps):
        key = (arch, steps)
        if key not in self.values:
            state = self.states.get(arch)
            if state is not None and state.steps > steps:
                state = None
            done = 0 if state is None else state.steps
            loss, state = train_and_eval(arch, steps, state=state, task=self.task, seed=self.seed, lr=self.lr,
                                         return_state=True)
            self.steps_trained += steps - done
            self.states[arch] = state
            self.values[key] = loss
        return self.values[key]


def arch_cost(arch, *, task=None, steps=1):
    """Deterministic costs of ``arch`` on the search's task: ``params`` (each shared tensor once) and ``flops``
    (:func:`effedu.measure.training_flops` of ``steps`` training steps of a batch; a shared block counts at every
    depth: sharing saves parameters, not compute)."""
    t = {**TASK, **(task or {})}
    model = arch.build(task_vocab_size(t["name"]), max_len=t["seq_len"])
    return {"params": count_parameters(model),
            "flops": training_flops(model, t["batch"] * t["seq_len"] * steps, seq_len=t["seq_len"])}


def measure_latency(arch, *, task=None, batch=1, repeat=7):
    """Median seconds of one forward pass of a ``batch`` of the task's sequences on this machine (eval mode, no
    gradients): HAT's hardware feedback. Machine-dependent, so reported only."""
    t = {**TASK, **(task or {})}
    model = arch.build(task_vocab_size(t["name"]), max_len=t["seq_len"]).eval()
    x = make_task(t["name"], batch, t["seq_len"], seed=0).inputs
    with torch.no_grad():
        return time_it(model, x, warmup=2, repeat=repeat)


def synthetic_fitness(arch, steps, *, noise=0.0, seed=0):
    """A cheap stand-in for training (tests, exercises, the explorer): a loss that falls with the budget and with
    capacity, plus a size penalty, plus optional deterministic per-architecture noise::

        f = 2 / (1 + steps/50) · (1 + 64/(d_model·n_layers)) + 1e-6·params_proxy + noise·u(arch)

    Not a model of any real task; deterministic in (arch, steps)."""
    check_int(steps, "steps", "synthetic_fitness")
    proxy = arch.n_layers * (4 * arch.d_model ** 2 + 2 * arch.d_model * arch.d_ff)
    if arch.share not in (None, "none"):
        proxy //= arch.n_layers
    u = random.Random(f"{seed}|{arch}").random() if noise else 0.0
    return 2.0 / (1.0 + steps / 50) * (1.0 + 64.0 / (arch.d_model * arch.n_layers)) + 1e-6 * proxy + noise * u


__all__ = ["GENES", "ATTENTION_KWARGS", "Arch", "SearchSpace", "dominates", "pareto_front", "Child", "SearchResult",
           "tournament_select", "hurdle_at", "evolve", "TASK", "task_batch", "val_batch", "TrainState",
           "train_and_eval", "TrainedFitness", "arch_cost", "measure_latency", "synthetic_fitness"]
