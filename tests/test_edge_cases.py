"""Edge cases of the fused backends: skipped params, 0-d/zero-size tensors, 1,000 tensors in one launch, several
param groups, misaligned tensors, table caching, and errors raised before any state is touched."""
import pytest
import torch

import fused_optim
from cases import fused_backends
from conftest import DEVICE
from tolerances import assert_close_atol, theta_atol

BACKENDS = fused_backends()


def launches():
    from fused_optim.kernels import engine
    return engine.LAUNCHES["count"]


def pair(params_fn, backend, **kw):
    a, b = params_fn(), params_fn()
    return a, b, fused_optim.FusedAdamW(a, backend=backend, **kw), fused_optim.FusedAdamW(b, backend="reference", **kw)


def step_both(a, b, oa, ob, grads):
    for pa, pb, g in zip(a, b, grads):
        if g is None:
            pa.grad = pb.grad = None
        else:
            pa.grad, pb.grad = g.clone(), g.clone()
    oa.step()
    ob.step()


def assert_same(a, b, oa, ob, lr, steps):
    for i, (pa, pb) in enumerate(zip(a, b)):
        if pb.numel():
            assert_close_atol(pa.detach(), pb.detach(), theta_atol([lr] * steps, pb.abs().max().item()), f"param {i}")
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert set(sa) == set(sb)
        if "step" in sb:
            assert float(sa["step"]) == float(sb["step"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    def mk():
        torch.manual_seed(3)
        return [torch.randn(n, device=DEVICE).requires_grad_() for n in (5, 6, 7)]
    a, b, oa, ob = pair(mk, backend, lr=1e-2)
    for k in range(6):
        grads = [torch.randn(5, device=DEVICE), None if k % 2 else torch.randn(6, device=DEVICE),
                 torch.randn(7, device=DEVICE) if k >= 3 else None]
        frozen = [p.detach().clone() for p in a]
        step_both(a, b, oa, ob, grads)
        for p, g, before in zip(a, grads, frozen):
            if g is None:
                assert torch.equal(p.detach(), before), "a param without grad moved"
    assert [float(oa.state[p]["step"]) for p in a] == [6.0, 3.0, 3.0]
    assert_same(a, b, oa, ob, 1e-2, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_and_0d(backend):
    def mk():
        torch.manual_seed(4)
        return [torch.randn((), device=DEVICE).requires_grad_(), torch.zeros(0, device=DEVICE).requires_grad_(),
                torch.zeros(3, 0, device=DEVICE).requires_grad_(), torch.randn(1, device=DEVICE).requires_grad_()]
    a, b, oa, ob = pair(mk, backend, lr=1e-2, amsgrad=True)
    for _ in range(4):
        step_both(a, b, oa, ob, [torch.randn(p.shape, device=DEVICE) for p in a])
    assert all(float(oa.state[p]["step"]) == 4 for p in a), "a zero-size tensor's step must advance too"
    assert oa.state[a[1]]["exp_avg"].shape == (0,)
    assert_same(a, b, oa, ob, 1e-2, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thousand_tensors_one_launch(backend):
    sizes = [1 + (i * 7) % 13 for i in range(1200)]

    def mk():
        torch.manual_seed(5)
        return [torch.randn(n, device=DEVICE).requires_grad_() for n in sizes]
    a, b, oa, ob = pair(mk, backend, lr=1e-2)
    for _ in range(2):
        grads = [torch.randn(n, device=DEVICE) for n in sizes]
        before = launches()
        step_both(a, b, oa, ob, grads)
        if backend == "triton":
            assert launches() - before == 1, "one launch for 1,200 tensors"
    assert_same(a, b, oa, ob, 1e-2, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_with_different_hyperparameters(backend):
    def mk():
        torch.manual_seed(6)
        return [torch.randn(n, device=DEVICE).requires_grad_() for n in (9, 10, 11, 12, 13, 14)]

    def groups(ps):
        return [dict(params=ps[:2]), dict(params=ps[2:4], lr=3e-2, weight_decay=0.0, betas=(0.5, 0.9)),
                dict(params=ps[4:], lr=torch.tensor(2e-2), amsgrad=True, eps=1e-3)]
    a, b = mk(), mk()
    oa = fused_optim.FusedAdamW(groups(a), lr=1e-2, backend=backend)
    ob = fused_optim.FusedAdamW(groups(b), lr=1e-2, backend="reference")
    for _ in range(5):
        before = launches()
        step_both(a, b, oa, ob, [torch.randn(p.shape, device=DEVICE) for p in a])
        if backend == "triton":
            assert launches() - before == 3, "one launch per param group, not per tensor"
    assert_same(a, b, oa, ob, 3e-2, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_views(backend):
    """Params that are views at odd offsets into one buffer: addresses not 16-byte aligned, no vector loads."""
    def mk():
        torch.manual_seed(7)
        buf = torch.randn(9000, device=DEVICE)
        return [torch.nn.Parameter(buf[1:4100]), torch.nn.Parameter(buf[4103:4110]), torch.nn.Parameter(buf[4111:])]
    a, b, oa, ob = pair(mk, backend, lr=1e-2)
    for _ in range(3):
        step_both(a, b, oa, ob, [torch.randn(p.shape, device=DEVICE) for p in a])
    table = next(iter(oa._tables.values()))
    assert table.aligned is False
    assert_same(a, b, oa, ob, 1e-2, 3)


@pytest.mark.parametrize("rule,key", [("adamw", "exp_avg"), ("adamw", "step"), ("lamb", "exp_avg_sq"),
                                      ("adafactor", "exp_avg_sq_row"), ("adafactor", "exp_avg")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_tensor_of_another_size_is_an_error(backend, rule, key):
    """A state tensor the kernels would read and write out of bounds (assigned by hand with another size) is a
    clear error before anything is written, on every fused backend (the Triton kernels trusted the table)."""
    cls = {"adamw": fused_optim.FusedAdamW, "lamb": fused_optim.FusedLAMB, "adafactor": fused_optim.FusedAdafactor}
    p = torch.randn(4, 6, device=DEVICE).requires_grad_()
    p.grad = torch.randn(4, 6, device=DEVICE)
    opt = cls[rule]([p], backend=backend, **({"beta1": 0.9} if rule == "adafactor" else {}))
    opt.step()
    opt.state[p][key] = torch.zeros(2, device=DEVICE)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    theta = p.detach().clone()
    with pytest.raises(ValueError, match=f"optimizer state '{key}' of tensor 0 of a launch group has 2 elements"):
        opt.step()
    assert torch.equal(p, theta) and all(torch.equal(opt.state[p][k], v) for k, v in before.items())


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_are_cached_and_rebuilt_on_storage_change(backend, planned, monkeypatch):
    """The table is reused while the storages are the same and rebuilt when they change: with the step plan, and
    without it (the full path's own cache, which the plan would otherwise hide)."""
    from fused_optim import tables
    builds = []
    real = tables.TensorTable.build.__func__
    monkeypatch.setattr(tables.TensorTable, "build",
                        classmethod(lambda cls, *a, **k: builds.append(1) or real(cls, *a, **k)))
    ps = [torch.randn(n, device=DEVICE).requires_grad_() for n in (3, 4)]
    opt = fused_optim.FusedAdamW(ps, backend=backend)
    if not planned:
        opt._planned_buckets = lambda: None
    grads = [torch.randn(p.shape, device=DEVICE) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    opt.step()
    assert len(builds) == 1, "same storages: the table is reused"
    kept = [p.grad for p in ps]
    opt.zero_grad(set_to_none=True)
    for p in ps:
        p.grad = torch.randn(p.shape, device=DEVICE)  # new storage (the old grads are still alive)
    opt.step()
    assert len(builds) == 2, "new grad storage: the table is rebuilt"
    del kept


def _errors():
    cases = {}
    emb = torch.randn(10, 3, device=DEVICE).requires_grad_()
    cases["sparse"] = (emb, torch.sparse_coo_tensor([[1, 2]], torch.ones(2, 3), (10, 3),
                                                     check_invariants=True).to(DEVICE), "sparse gradient")
    base = torch.randn(4, 6, device=DEVICE)
    nc = torch.nn.Parameter(base.t())
    cases["non-contiguous"] = (nc, torch.randn(6, 4, device=DEVICE), "non-contiguous")
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sparse", "non-contiguous"])
def test_bad_param_errors_before_any_state_is_touched(backend, kind):
    good = torch.randn(5, device=DEVICE).requires_grad_()
    bad, bad_grad, match = _errors()[kind]
    opt = fused_optim.FusedAdam([dict(params=[good]), dict(params=[torch.zeros(1, device=DEVICE), bad])],
                                lr=0.1, backend=backend)
    good.grad = torch.ones(5, device=DEVICE)
    bad.grad = bad_grad
    good_before, bad_before = good.detach().clone(), bad.detach().clone()
    with pytest.raises(RuntimeError, match=match) as info:
        opt.step()
    assert "param 1 of param group 1" in str(info.value)
    assert len(opt.state) == 0, "no state may be created by a failing step"
    assert torch.equal(good.detach(), good_before) and torch.equal(bad.detach(), bad_before)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_complex_param_is_refused_when_its_group_is_added(backend):
    good = torch.nn.Parameter(torch.ones(2, device=DEVICE))
    cpx = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64, device=DEVICE))
    with pytest.raises(RuntimeError, match=r"param 1 of param group 0 is complex.*view_as_real"):
        fused_optim.FusedAdamW([good, cpx], backend=backend)
    opt = fused_optim.FusedAdamW([good], backend=backend)
    with pytest.raises(RuntimeError, match=r"param 0 of param group 1 is complex"):
        opt.add_param_group(dict(params=[cpx]))
    assert len(opt.param_groups) == 1, "a group that fails validation is not added"


def test_named_backend_that_cannot_run_errors_at_construction():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64, device=DEVICE))
    for backend in fused_backends():
        with pytest.raises(fused_optim.BackendUnavailable, match="param 0 of param group 0.*float64"):
            fused_optim.FusedAdam([p], backend=backend)
    meta = torch.nn.Parameter(torch.ones(3, device="meta"))
    with pytest.raises(fused_optim.BackendUnavailable, match="meta"):
        fused_optim.FusedAdam([meta], backend="triton")


def test_auto_picks_a_backend_per_device_and_dtype():
    from fused_optim import backends
    assert backends.resolve("auto", torch.device("cpu"), torch.float64, "x") == "reference"
    cpu = backends.resolve("auto", torch.device("cpu"), torch.float32, "x")
    assert cpu == ("native" if backends.unusable("native", torch.device("cpu")) is None else "reference")
    if torch.cuda.is_available():
        assert backends.resolve("auto", torch.device("cuda"), torch.bfloat16, "x") in ("native", "triton")


def test_backend_resolution_knows_which_rules_a_backend_has(monkeypatch):
    """A rule the native extension does not implement (not in native.RULES; here LAMB's, removed for the test):
    naming native for it is a clear error, and auto never picks native for it."""
    from fused_optim import backends, native
    cpu = torch.device("cpu")
    monkeypatch.delitem(native.RULES, "lamb")
    monkeypatch.setattr(backends, "_resolved", {})  # resolve() memoizes its answers
    monkeypatch.setattr(backends, "_warned", set())  # and warns once per reason
    for rule in ("lamb", "no_such_rule"):
        with pytest.warns(UserWarning, match="the native backend cannot run"):
            assert backends.resolve("auto", cpu, torch.float32, "x", rule=rule) != "native"
        with pytest.raises(fused_optim.BackendUnavailable, match=f"native extension has no '{rule}' rule"):
            backends.resolve("native", cpu, torch.float32, "x", rule=rule)
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(fused_optim.BackendUnavailable, match="param 0 of param group 0"):
        fused_optim.FusedLAMB([p], backend="native")


def test_auto_picks_native_for_every_rule_it_has():
    """backend='auto' on CPU picks native for each rule of native.RULES (when the extension is usable)."""
    from fused_optim import backends, native
    cpu = torch.device("cpu")
    if backends.unusable("native", cpu) is not None:
        pytest.skip(f"native backend unusable: {backends.unusable('native', cpu)}")
    assert {"adam", "lamb"} <= set(native.RULES)
    for rule in native.RULES:
        assert backends.resolve("auto", cpu, torch.float32, "x", rule=rule) == "native"
    p = torch.nn.Parameter(torch.ones(3))
    opt = fused_optim.FusedLAMB([p])
    p.grad = torch.ones(3)
    opt.step()
    assert {b.backend for b in opt._collect()} == {"native"}
