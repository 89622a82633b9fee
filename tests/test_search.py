"""Chapter 13: the search space, tournament evolution with progressive dynamic hurdles, the Pareto front, and the
resumable trainer. Unit tests use a synthetic fitness (no training) plus tiny real training runs."""
import itertools
import math
import random

import pytest
import torch

from effedu.general import search as S
from effedu.general.search import Arch, SearchSpace, evolve, pareto_front, synthetic_fitness
from effedu.measure import count_parameters, forward_flops

SPACE = dict(n_layers=(1, 2, 3), d_model=(12, 16, 32), n_heads=(1, 3, 4), d_ff=(32, 64),
             attention=("dense", "local"), share=(None, "all"))


def noisy(arch, steps):
    return synthetic_fitness(arch, steps, noise=0.5)


# ---------------------------------------------------------------- the space


def test_space_is_every_valid_combination():
    sp = SearchSpace(**SPACE)
    brute = [g for g in itertools.product(*(SPACE[k] for k in S.GENES))
             if g[1] % g[2] == 0 and not (g[0] == 1 and g[5] == "all")]
    assert sp.size == len(brute) == len(set(sp.archs()))
    assert {tuple(vars(a).values()) for a in sp.archs()} == set(brute)
    assert all(sp.validate(a) is a for a in sp.archs())


@pytest.mark.parametrize("kw, match", [
    (dict(n_layers=()), "n_layers must offer at least one choice"),
    (dict(d_ff=[]), "d_ff must offer at least one choice"),
    (dict(d_model=(10,), n_heads=(3, 4)), "no valid architecture"),
    (dict(attention=("dense", "nope")), "unknown attention 'nope'"),
    (dict(share=("everything",)), "unknown share 'everything'"),
    (dict(n_heads=(0, 2)), "n_heads must be an int ≥ 1"),
    (dict(d_model=(32, 32)), "repeated choices"),
])
def test_space_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(**kw)


def test_validate_names_the_gene():
    sp = SearchSpace(**SPACE)
    with pytest.raises(ValueError, match="d_ff=999 is not one of"):
        sp.validate(Arch(1, 16, 4, 999))
    with pytest.raises(ValueError, match="d_model=16 is not divisible by n_heads=3"):
        sp.validate(Arch(1, 16, 3, 32))
    with pytest.raises(ValueError, match="share='all' with n_layers=1 is the unshared model"):
        sp.validate(Arch(1, 16, 4, 32, share="all"))
    only_shared = SearchSpace(n_layers=(1, 2), d_model=(16,), n_heads=(4,), d_ff=(32,), share=("all",))
    assert only_shared.size == 2  # no unshared choice: the 1-layer point stays
    with pytest.raises(TypeError, match="expected an Arch"):
        sp.validate((1, 16, 4, 32))
    with pytest.raises(TypeError, match="rng must be a random.Random or an int seed"):
        sp.sample("seed")


def test_sample_and_mutate_are_seeded_valid_and_change_one_gene():
    sp = SearchSpace(**SPACE)
    draws = [sp.sample(random.Random(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng, seen = random.Random(0), set()
    arch = sp.sample(rng)
    for _ in range(300):
        child = sp.mutate(arch, rng)
        assert child in sp and child != arch
        changed = {g for g in S.GENES if getattr(child, g) != getattr(arch, g)}
        # one gene, or d_model plus the n_heads repair it forced, or n_layers → 1 plus the share repair
        assert len(changed) == 1 or changed in ({"d_model", "n_heads"}, {"n_layers", "share"}), (arch, child)
        if changed == {"n_layers", "share"}:
            assert child.n_layers == 1 and child.share is None
        if changed == {"d_model", "n_heads"}:
            assert child.n_heads == sp.repair(S.Arch(**{**vars(arch), "d_model": child.d_model})).n_heads
        seen |= changed
        arch = child
    assert seen == set(S.GENES)  # every gene mutates at some point
    single = SearchSpace(n_layers=(2,), d_model=(16,), n_heads=(4,), d_ff=(32,))
    assert single.size == 1 and single.mutate(single.archs()[0], 0) == single.archs()[0]


def test_repair_is_deterministic():
    sp = SearchSpace(**SPACE)
    assert sp.repair(Arch(1, 16, 3, 32)).n_heads == 1  # largest allowed ≤ 3 dividing 16
    assert sp.repair(Arch(1, 12, 4, 32)).n_heads == 4  # 12 % 4 == 0: unchanged
    assert sp.repair(Arch(1, 32, 3, 32)).n_heads == 1
    assert sp.repair(Arch(1, 32, 4, 32, share="all")) == Arch(1, 32, 4, 32)


def test_arch_builds_the_model_it_names():
    a = Arch(3, 16, 4, 32, "local", "all")
    m = a.build(12, max_len=13)
    assert len(m.blocks) == 3 and m.blocks[0] is m.blocks[2]
    assert m.config.attention == "local" and m.config.attention_kwargs == S.ATTENTION_KWARGS["local"]
    assert count_parameters(m) < count_parameters(Arch(3, 16, 4, 32, "local").build(12, max_len=13))
    assert hash(a) == hash(Arch(3, 16, 4, 32, "local", "all"))


# ---------------------------------------------------------------- Pareto front


def test_pareto_front_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n, k in ((1, 2), (17, 2), (40, 3), (25, 1)):
        pts = [dict(zip("abc", torch.randint(0, 6, (k,), generator=g).tolist())) for _ in range(n)]
        objs = list("abc"[:k])
        front = pareto_front(pts, objs)
        vec = [[p[o] for o in objs] for p in pts]
        brute = [p for p, v in zip(pts, vec)
                 if not any(all(x <= y for x, y in zip(w, v)) and w != v for w in vec)]
        assert front == brute
        fv = [[p[o] for o in objs] for p in front]
        assert not any(S.dominates(a, b) for a in fv for b in fv)  # non-dominated
        for v in vec:  # complete: every point off the front is dominated by a point on it
            assert v in fv or any(S.dominates(f, v) for f in fv)


def test_pareto_front_ties_callables_and_errors():
    pts = [{"x": 1, "y": 1}, {"x": 1, "y": 1}, {"x": 2, "y": 0}, {"x": 2, "y": 2}]
    assert pareto_front(pts, ["x", "y"]) == pts[:3]
    assert pareto_front(pts, [lambda p: -p["x"], "y"]) == [pts[2]]
    with pytest.raises(ValueError, match="objectives must be a non-empty list"):
        pareto_front(pts, "x")
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([{"x": math.nan}], ["x"])


# ---------------------------------------------------------------- evolution


def test_same_seed_same_search_and_other_seed_differs():
    sp = SearchSpace(**SPACE)
    runs = [evolve(sp, noisy, population=6, generations=4, seed=s, hurdles=(10, 30, 90)).as_dict() for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0]["children"] != runs[2]["children"]
    assert len(runs[0]["children"]) == 6 * 4


def test_hurdles_off_is_plain_tournament_selection():
    sp = SearchSpace(**SPACE)
    plain = evolve(sp, noisy, population=5, generations=5, tournament=2, seed=1, steps=40)
    one_stage = evolve(sp, noisy, population=5, generations=5, tournament=2, seed=1, hurdles=(40,))
    assert [c.as_dict() for c in plain.children] == [c.as_dict() for c in one_stage.children]
    assert plain.total_steps == 5 * 5 * 40 and all(c.steps == 40 for c in plain.children)
    # the oracle: replay regularised evolution by hand with the same random stream
    rng, alive, archs = random.Random(1), [], []
    for _ in range(5):
        a = sp.sample(rng)
        alive.append((noisy(a, 40), len(archs)))
        archs.append(a)
    for _ in range(5 * 4):
        parent = min(rng.sample(alive, 2), key=lambda t: t[0])  # lowest fitness, the first drawn on ties
        a = sp.mutate(archs[parent[1]], rng)
        alive = alive[1:] + [(noisy(a, 40), len(archs))]
        archs.append(a)
    assert [c.arch for c in plain.children] == archs


def test_hurdle_arithmetic():
    sp = SearchSpace(**SPACE)
    budgets, P = (10, 30, 90), 6
    res = evolve(sp, noisy, population=P, generations=5, seed=2, hurdles=budgets)
    ch = res.children
    for c in ch:
        alive = ch[max(0, c.index - P):c.index]  # the population the child was about to join
        assert c.budgets == list(budgets[:len(c.budgets)])
        for i, h in enumerate(c.hurdles):
            vals = [a.fitnesses[i] for a in alive if len(a.fitnesses) > i]
            assert h == (sum(vals) / len(vals) if vals else None)
        # it trained on after stage i exactly when it beat hurdle i (or there was none)
        for i in range(len(c.budgets) - 1):
            assert c.hurdles[i] is None or c.fitnesses[i] < c.hurdles[i]
        if len(c.budgets) < len(budgets):
            assert c.hurdles[-1] is not None and not c.fitnesses[-1] < c.hurdles[-1]
        assert c.fitnesses == [noisy(c.arch, b) for b in c.budgets]
    # steps spent = Σ over stages of (budget increment) × (children that reached that stage)
    reached = [sum(len(c.budgets) > i for c in ch) for i in range(len(budgets))]
    increments = [b - a for a, b in zip((0,) + budgets, budgets)]
    assert res.total_steps == sum(n * d for n, d in zip(reached, increments)) == sum(c.steps for c in ch)
    assert reached[0] == len(ch) and reached[1] < len(ch)  # hurdles stopped some children
    assert res.total_steps < len(ch) * budgets[-1]
    assert res.best.steps == budgets[-1]
    assert res.best.fitness == min(c.fitness for c in ch if c.steps == budgets[-1])


def test_selection_never_reads_latency_or_costs():
    sp = SearchSpace(**SPACE)
    noise = random.Random(9)
    with_lat = evolve(sp, noisy, population=4, generations=3, seed=3, hurdles=(5, 20),
                      latency_fn=lambda a: noise.random(), cost_fn=S.arch_cost)
    without = evolve(sp, noisy, population=4, generations=3, seed=3, hurdles=(5, 20))
    assert [c.arch for c in with_lat.children] == [c.arch for c in without.children]
    assert all(c.latency is not None and {"params", "flops"} <= set(c.cost) for c in with_lat.children)
    front = with_lat.pareto_front(("fitness", "params"))
    assert front and all(c.steps == 20 for c in front)


def test_tournament_select():
    pop = [S.Child(i, Arch(1, 16, 1, 32), 0, None, [1], [f]) for i, f in enumerate([3.0, 1.0, 2.0, 1.0])]
    for seed in range(5):  # everyone drawn: a best one (of the tie 1 / 3, whichever was drawn first)
        rng = random.Random(seed)
        order = random.Random(seed).sample(pop, 4)
        assert S.tournament_select(pop, 4, rng) is next(c for c in order if c.fitness == 1.0)
    picks = {S.tournament_select(pop, 1, random.Random(s)).index for s in range(40)}
    assert picks == {0, 1, 2, 3}  # a tournament of one is a uniform draw
    assert S.hurdle_at(pop, 0) == pytest.approx(7 / 4) and S.hurdle_at(pop, 1) is None


@pytest.mark.parametrize("kw, err, match", [
    (dict(population=1), ValueError, "population must be ≥ 2"),
    (dict(tournament=0), ValueError, "tournament must be an int ≥ 1"),
    (dict(generations=0), ValueError, "generations must be an int ≥ 1"),
    (dict(hurdles=(30, 10)), ValueError, "hurdles must be increasing"),
    (dict(hurdles=()), ValueError, "hurdles must be a non-empty list"),
    (dict(steps=0), ValueError, "steps must be an int ≥ 1"),
    (dict(seed=-1), ValueError, "seed must be a non-negative int"),
])
def test_evolve_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        evolve(SearchSpace(**SPACE), noisy, **kw)


def test_evolve_bad_space_and_fitness():
    with pytest.raises(TypeError, match="space must be a SearchSpace"):
        evolve(SPACE, noisy)
    with pytest.raises(TypeError, match="fitness_fn must be callable"):
        evolve(SearchSpace(**SPACE), 1.0)
    with pytest.raises(ValueError, match="fitness_fn returned NaN"):
        evolve(SearchSpace(**SPACE), lambda a, s: math.nan)


# ---------------------------------------------------------------- real training (tiny)


TINY = {"seq_len": 7, "batch": 8, "val_samples": 16}


def test_continuing_equals_training_from_scratch():
    a = Arch(2, 16, 2, 32, "dense")
    fresh = S.train_and_eval(a, 6, task=TINY)
    first, state = S.train_and_eval(a, 3, task=TINY, return_state=True)
    assert state.steps == 3
    assert S.train_and_eval(a, 6, task=TINY, state=state) == fresh  # bit for bit
    assert math.isfinite(fresh) and fresh != first
    with pytest.raises(ValueError, match="below the 6 steps already trained"):
        S.train_and_eval(a, 4, task=TINY, state=state)
    with pytest.raises(TypeError, match="arch must be an Arch"):
        S.train_and_eval((2, 16), 3)


def test_trained_fitness_counts_the_steps_it_runs():
    sp = SearchSpace(n_layers=(1, 2), d_model=(16,), n_heads=(2,), d_ff=(32,), share=(None, "all"))
    runs = []
    for _ in range(2):
        fit = S.TrainedFitness(task=TINY)
        res = evolve(sp, fit, population=2, generations=2, tournament=2, seed=0, hurdles=(2, 4))
        runs.append((res.as_dict(), fit.steps_trained))
        # memoised duplicates train nothing: never more than the search's exact count
        assert fit.steps_trained <= res.total_steps
        assert fit.steps_trained == sum(max(b for (a2, b) in fit.values if a2 == a) for a in fit.states)
    assert runs[0] == runs[1]


def test_arch_cost_is_the_meter():
    a, shared = Arch(2, 16, 2, 32), Arch(2, 16, 2, 32, share="all")
    c, cs = S.arch_cost(a, task=TINY, steps=3), S.arch_cost(shared, task=TINY, steps=3)
    m = a.build(12, max_len=7)
    assert c["params"] == count_parameters(m)
    assert c["flops"] == 3 * forward_flops(m, 7) * 8 * 3  # 3 × forward per sequence, 8 sequences, 3 steps
    assert cs["params"] < c["params"] and cs["flops"] == c["flops"]  # sharing saves parameters, not compute
    assert S.measure_latency(a, task=TINY, repeat=1) > 0
