"""Expert parallelism over real processes (chapter 10): outputs and gradients equal the layer applied group by group.

One launch of 2 processes runs every equality case (spawning costs seconds); the dispatch/combine kernels run with
``backend="torch"`` here (numba would compile in every process; its kernels are tested in test_moe_dispatch.py).
"""
import multiprocessing
import traceback

import pytest
import torch

from effedu.general.expert_parallel import (AllToAll, expert_parallel_reference, expert_parallel_run,
                                            expert_parallel_runs)
from effedu.general.moe import MoEFeedForward
from effedu.general.processes import init_gloo, launch, write_result

W = 2
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _case(seed, *, d=6, d_ff=10, E=4, k=1, cf=0.5, N=22, dtype=torch.float64, starve=()):
    torch.manual_seed(seed)
    layer = MoEFeedForward(d, d_ff, E, k=k, capacity_factor=cf, z_weight=1e-3, backend="torch").to(dtype)
    x = torch.randn(N, d, dtype=dtype)
    if starve:  # no token ever chooses these experts: their rank receives nothing
        x = x.abs()  # logit −Σ|x| < x·w for every other expert (|w| ≤ 1/√d < 1)
        with torch.no_grad():
            layer.router.w_gate.weight[list(starve)] = -1.0
    return {"layer": layer, "x": x, "backend": "torch"}


CASES = {
    "k1-drops-f64": _case(0, k=1, cf=0.5),
    "k2-drops-f64": _case(1, k=2, cf=0.6, N=30),
    "k2-nocap-f32-odd": _case(2, k=2, cf=None, d=5, E=6, N=26, dtype=torch.float32),
    "rank1-starved-f64": _case(3, k=1, cf=1.0, starve=(2, 3)),
}


@pytest.fixture(scope="module")
def runs():
    results = expert_parallel_runs(list(CASES.values()), world_size=W, repeats=2, warmup=1, timeout=300)
    return dict(zip(CASES, results))


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_the_layer_group_by_group(runs, name):
    case, res = CASES[name], runs[name]
    ref = expert_parallel_reference(case["layer"], case["x"], world_size=W)
    tol = TOL[case["x"].dtype]
    torch.testing.assert_close(res["output"], ref["output"], **tol)
    torch.testing.assert_close(res["x_grad"], ref["x_grad"], **tol)
    assert set(res["grads"]) == {n for n, _ in case["layer"].named_parameters()}
    for n, p in case["layer"].named_parameters():
        assert res["grads"][n].shape == p.shape
        torch.testing.assert_close(res["grads"][n], ref["grads"][n], **tol, msg=lambda m: f"{n}: {m}")
    assert res["aux_loss"] == pytest.approx(ref["aux_loss"], rel=1e-5)
    assert float(ref["output"].abs().sum()) > 0 and float(ref["grads"]["router.w_gate.weight"].abs().sum()) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_drops_capacity_and_bytes_sent_are_those_of_the_groups_routing(runs, name):
    case, res = CASES[name], runs[name]
    layer, x = case["layer"], case["x"]
    E, El, d = layer.n_experts, layer.n_experts // W, x.shape[1]
    groups = [layer.route(g) for g in x.chunk(W)]
    assert res["dropped"] == [int((r["slot"] < 0).sum()) for r in groups]
    assert res["capacity"] == [r["capacity"] for r in groups]
    # kept[s][e]: choices of group s kept by expert e (its rank: e // El)
    kept = [torch.bincount(r["expert_index"][r["slot"] >= 0], minlength=E).tolist() for r in groups]
    for r in range(W):
        sent = sum(kept[r][e] for e in range(E) if e // El != r)  # my tokens to other ranks' experts
        returned = sum(kept[s][e] for s in range(W) if s != r for e in range(r * El, (r + 1) * El))
        # counts (int64) once; rows out and back forward, and the same rows' gradients backward
        expected = 8 * El * (W - 1) + 2 * (sent + returned) * d * x.element_size()
        assert res["sent_bytes"][r] == expected
    times = res["times"]
    assert set(times) == {"compute", "all_to_all", "total", "all_reduce"}
    for r in range(W):
        assert times["compute"][r] + times["all_to_all"][r] == pytest.approx(times["total"][r])
        assert times["all_to_all"][r] > 0 and times["total"][r] > 0
    assert len(res["step_times"]) == 2 and res["world_size"] == W


def test_the_cases_have_drops_and_a_starved_rank():
    drops = {n: sum(int((r["slot"] < 0).sum()) for r in map(c["layer"].route, c["x"].chunk(W))) for n, c in CASES.items()}
    assert drops["k1-drops-f64"] > 0 and drops["k2-drops-f64"] > 0 and drops["k2-nocap-f32-odd"] == 0
    c = CASES["rank1-starved-f64"]
    assert int((c["layer"].route(c["x"])["expert_index"] >= 2).sum()) == 0


def _adjoint_worker(rank, world_size, store_path, result_dir, spec):
    """⟨A x, v⟩ summed over ranks = ⟨x, Aᵀ v⟩ summed over ranks: AllToAll's backward is the forward's adjoint.

    (torch.autograd.gradcheck does not apply rank by rank: the all-to-all couples the ranks' Jacobians. For a
    linear map this dot-product test is the exact check; the layer tests above check the gradients end to end.)
    """
    dist = None
    try:
        dist = init_gloo(rank, world_size, store_path, 60.0, 1)
        splits = [[1, 3], [2, 0]]  # splits[s][q]: rows rank s sends to rank q (uneven, one 0)
        gen = torch.Generator().manual_seed(100)
        xs = [torch.randn(sum(splits[s]), 3, generator=gen, dtype=torch.float64) for s in range(world_size)]
        vs = [torch.randn(sum(splits[s][q] for s in range(world_size)), 3, generator=gen, dtype=torch.float64)
              for q in range(world_size)]
        x = xs[rank].clone().requires_grad_()
        out_splits = [splits[s][rank] for s in range(world_size)]
        y = AllToAll.apply(x, out_splits, splits[rank], None)
        expected = torch.cat([xs[s][sum(splits[s][:rank]):sum(splits[s][:rank + 1])] for s in range(world_size)])
        (y * vs[rank]).sum().backward()
        dots = torch.stack([(y.detach() * vs[rank]).sum(), (x.detach() * x.grad).sum()])
        dist.all_reduce(dots)
        write_result(result_dir, rank, {"y_ok": bool(torch.equal(y.detach(), expected)), "dots": dots})
    except BaseException:
        write_result(result_dir, rank, {"error": traceback.format_exc()})
        raise
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def test_all_to_all_sends_rows_by_split_sizes_and_its_backward_is_the_adjoint():
    payloads = launch(_adjoint_worker, "adjoint test", 2, {}, 300, what="rank")
    assert all(p["y_ok"] for p in payloads)
    lhs, rhs = payloads[0]["dots"].tolist()
    assert lhs == pytest.approx(rhs, rel=1e-12) and abs(lhs) > 1e-3


def test_a_timeout_terminates_and_reaps_the_processes():
    c = CASES["k1-drops-f64"]
    with pytest.raises(TimeoutError, match="rank processes did not finish within timeout"):
        expert_parallel_run(c["layer"], c["x"], timeout=0.05)
    assert not multiprocessing.active_children()


def test_bad_input_is_refused_before_any_process_starts():
    c = CASES["k1-drops-f64"]
    layer, x = c["layer"], c["x"]
    with pytest.raises(ValueError, match=r"world_size=3 does not divide the layer's n_experts=4"):
        expert_parallel_run(layer, x[:21], world_size=3)
    with pytest.raises(ValueError, match=r"N=21 tokens must split into world_size=2 equal groups"):
        expert_parallel_run(layer, x[:21])
    with pytest.raises(ValueError, match=r"world_size must be an int ≥ 1, got 0"):
        expert_parallel_run(layer, x, world_size=0)
    with pytest.raises(TypeError, match=r"world_size must be an int"):
        expert_parallel_run(layer, x, world_size=2.0)
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            expert_parallel_run(layer, x, timeout=bad)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        expert_parallel_run(layer, x.reshape(2, 11, 6))
    with pytest.raises(ValueError, match="d_model=6 features per token, got 5"):
        expert_parallel_run(layer, x[:, :5])
    with pytest.raises(TypeError, match="x must have the layer's dtype torch.float64, got torch.float32"):
        expert_parallel_run(layer, x.float())
    with pytest.raises(ValueError, match=r"grad_output must be a tensor of x's shape \(22, 6\)"):
        expert_parallel_run(layer, x, grad_output=torch.zeros(3))
    with pytest.raises(TypeError, match="layer must be an effedu.general.moe.MoEFeedForward"):
        expert_parallel_run(torch.nn.Linear(6, 6), x)
    with pytest.raises(ValueError, match="repeats must be an int ≥ 1"):
        expert_parallel_run(layer, x, repeats=0)
    with pytest.raises(TypeError, match="cases must be a non-empty list"):
        expert_parallel_runs([])
    with pytest.raises(TypeError, match="each case must be a dict with 'layer' and 'x'"):
        expert_parallel_runs([{"layer": layer}])
    with pytest.raises(ValueError, match=r"expert_parallel_reference: world_size=3 does not divide"):
        expert_parallel_reference(layer, x[:21], world_size=3)
