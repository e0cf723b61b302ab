"""Edge cases of the fused backends: skipped params, 0-d/zero-size tensors, 1,000 tensors in one launch, several
param groups, misaligned tensors, a NaN through amsgrad's running max, table caching, and errors raised before any
state is touched."""
import weakref

import pytest
import torch

import fused_optim
from cases import DTYPES, case_id, fused_backends
from conftest import DEVICE
from tolerances import (assert_close_atol, assert_same_nonfinite, assert_within_ulps, param_ulps, state_atol,
                        theta_atol)

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


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_keeps_a_nan_in_max_exp_avg_sq(backend, dtype):
    """amsgrad's v̂max = max(v̂max, v) propagates a NaN from either side, as torch.maximum does in the reference
    (and torch.optim.Adam, and the native rule's max_nan): from v after a NaN grad (step 1), and from v̂max itself
    (a NaN written into the state before step 3, as a checkpoint saved after a NaN step holds one). The NaN stays in
    v̂max and reaches the param. The Triton rule took max(v̂max, NaN) = v̂max (tl.maximum's default drops a NaN), so
    v̂max kept a number where the reference has NaN. Param and every state tensor, NaN/inf at exactly the
    reference's elements and the finite rest within the parity bounds, at every step."""
    lr, n = 1e-2, 7

    def mk():
        return [torch.linspace(-1, 1, n, device=DEVICE).to(dtype).requires_grad_()]
    a, b = mk(), mk()
    oa = fused_optim.FusedAdam(a, lr=lr, amsgrad=True, backend=backend)
    ob = fused_optim.FusedAdam(b, lr=lr, amsgrad=True, backend="reference")
    for step in range(1, 5):
        g = torch.randn(n, device=DEVICE)
        if step == 1:
            g[1] = float("nan")
        if step == 3:
            for opt, p in ((oa, a[0]), (ob, b[0])):
                opt.state[p]["max_exp_avg_sq"][4] = float("nan")  # in place: the cached table stays valid
        step_both(a, b, oa, ob, [g.to(dtype)])
        pa, pb = a[0].detach(), b[0].detach()
        finite = assert_same_nonfinite(pa, pb, f"param, step {step}")
        if dtype == torch.float32:
            assert_close_atol(pa[finite], pb[finite], theta_atol([lr] * step, pb[finite].abs().max().item()),
                              f"param, step {step}")
        else:
            assert_within_ulps(pa[finite], pb[finite], param_ulps(dtype, False), f"param, step {step}")
        sa, sb = oa.state[a[0]], ob.state[b[0]]
        assert set(sa) == set(sb) and float(sa["step"]) == float(sb["step"]) == step
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            finite = assert_same_nonfinite(sa[key], sb[key], f"{key}, step {step}")
            assert_close_atol(sa[key][finite], sb[key][finite], state_atol(step, sb[key][finite].abs().max().item()),
                              f"{key}, step {step}")
    assert torch.isnan(ob.state[b[0]]["max_exp_avg_sq"][[1, 4]]).all(), "the test no longer puts NaN in v̂max"


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
    with pytest.raises(ValueError, match=f"optimizer state '{key}' of param 0 of param group 0 has 2 elements"):
        opt.step()
    assert torch.equal(p, theta) and all(torch.equal(opt.state[p][k], v) for k, v in before.items())


@pytest.mark.parametrize("rule", ["adamw", "lamb", "adafactor"])
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_a_step_keeps_no_grad_alive(backend, rule):
    """After a step and ``zero_grad(set_to_none=True)`` the grads are freed at once, as with torch.optim, on the
    full path and on planned steps. The step plan held the last step's grads: a second set of grads in memory
    during the next backward, and new grads at new addresses, so a table rebuilt at every step."""
    cls = {"adamw": fused_optim.FusedAdamW, "lamb": fused_optim.FusedLAMB, "adafactor": fused_optim.FusedAdafactor}
    params = [torch.randn(s, device=DEVICE).requires_grad_() for s in ((4, 6), (5,))]
    opt = cls[rule](params, backend=backend, **({"max_grad_norm": 1.0} if rule == "lamb" else {}))
    for step in range(3):  # the full path, then planned steps
        for p in params:
            p.grad = torch.randn(p.shape, device=DEVICE)
        grads = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(g() is None for g in grads), f"a grad of step {step} is alive"


@pytest.mark.parametrize("block", [16, None], ids=["block16", "default"])
def test_block_map(block):
    """TensorTable's block map against its statement: each tensor cut into ``block``-element blocks in order (the
    last one partial), a zero-size tensor given one empty block; ``first_block`` the running count; addresses and
    sizes as the tensors have them; the arrival counters zero."""
    from fused_optim.tables import DEFAULT_BLOCK, TensorTable
    size = block or DEFAULT_BLOCK
    numels = [0, 1, size - 1, size, size + 1, 3 * size, 0, 2 * size + 5]
    params = [torch.zeros(n, device=DEVICE) for n in numels]
    states = [torch.zeros(n, device=DEVICE) if i % 3 else None for i, n in enumerate(numels)]
    table = TensorTable.build({"param": params, "exp_avg": states}, DEVICE, block)
    want_tensor, want_start, want_first = [], [], [0]
    for i, n in enumerate(numels):
        starts = list(range(0, n, size)) or [0]
        want_tensor += [i] * len(starts)
        want_start += starts
        want_first.append(len(want_tensor))
    assert table.block_tensor.tolist() == want_tensor and table.block_tensor.dtype == torch.int32
    assert table.block_start.tolist() == want_start and table.block_start.dtype == torch.int64
    assert table.first_block.tolist() == want_first and table.first_block.dtype == torch.int32
    assert (table.n_tensors, table.n_blocks, table.block) == (len(numels), len(want_tensor), size)
    assert table.numels.tolist() == numels and table.arrivals.tolist() == [0] * len(numels)
    assert table.ptrs["param"].tolist() == [p.data_ptr() for p in params]
    assert table.ptrs["exp_avg"].tolist() == [0 if t is None else t.data_ptr() for t in states]


def _transposed(t):
    """The same values in a column-major layout: a non-contiguous tensor."""
    return t.t().contiguous().t()


# (rule, what is changed, the change, the error): operands the kernels cannot take, after one step. "same address"
# cases keep the tensor's address, so that the cached table and the step plan see the addresses they recorded.
BAD_OPERANDS = {
    "exp_avg bf16": ("adamw", "exp_avg", lambda t: t.to(torch.bfloat16), "has dtype torch.bfloat16, expected "
                     "torch.float32"),
    "step float64": ("adamw", "step", lambda t: t.to(torch.float64), "has dtype torch.float64"),
    "exp_avg_sq transposed": ("lamb", "exp_avg_sq", _transposed, r"is laid out unlike its param \(shape \(4, 6\), "
                              r"strides \(1, 4\); the param's: \(4, 6\), \(6, 1\)\)"),
    "exp_avg as int32, same address": ("adamw", "exp_avg", lambda t: t.view(torch.int32), "has dtype torch.int32"),
    "exp_avg resized, same address": ("lamb", "exp_avg", lambda t: t.resize_(5), "has 5 elements, expected 24"),
    "row statistics resized, same address": ("adafactor", "exp_avg_sq_row", lambda t: t.resize_(2),
                                             "has 2 elements, expected 4"),
    "exp_avg strided, same address": ("adafactor", "exp_avg", lambda t: t.as_strided((4, 6), (1, 4)),
                                      "is laid out unlike its param"),
    "grad sliced, same address": ("adamw", "grad", lambda t: t.view(-1)[:8], "has 8 elements, expected 24"),
}


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
@pytest.mark.parametrize("case", BAD_OPERANDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_operand_the_kernels_cannot_take_is_an_error(backend, case, planned):
    """State of another dtype, layout or size, and a grad of another size, are a clear error before anything is
    written, on every fused backend, also at the address the table and the step plan recorded (the Triton kernels
    read such state as fp32 of the param's size, silently wrong or out of bounds)."""
    rule, key, change, message = BAD_OPERANDS[case]
    cls = {"adamw": fused_optim.FusedAdamW, "lamb": fused_optim.FusedLAMB, "adafactor": fused_optim.FusedAdafactor}
    p = torch.randn(4, 6, device=DEVICE).requires_grad_()
    others = [torch.randn(3, device=DEVICE).requires_grad_() for _ in range(2)]
    for t in [p, *others]:
        t.grad = torch.randn(t.shape, device=DEVICE)
    # p is param 1 of param group 1, in the same launch group as others[1]: the error names it
    groups = [{"params": others[:1]}, {"params": [others[1], p]}]
    opt = cls[rule](groups, backend=backend, **({"beta1": 0.9} if rule == "adafactor" else {}))
    opt.step()
    opt.step()  # the second step runs planned: the plan is recorded and used
    if not planned:
        opt._planned_buckets = lambda: None
    old = p.grad if key == "grad" else opt.state[p][key]
    new = change(old)
    if key == "grad":
        p.grad.data = new
    else:
        opt.state[p][key] = new
    if "same address" in case:
        assert new.data_ptr() == old.data_ptr()
    before = [(t.detach().clone(), {k: v.clone() for k, v in opt.state[t].items()}) for t in [p, *others]]
    what = "the grad" if key == "grad" else f"optimizer state '{key}'"
    with pytest.raises(ValueError, match=f"{what} of param 1 of param group 1 {message}"):
        opt.step()
    for t, (theta, state) in zip([p, *others], before):  # nothing written, in any launch group
        assert torch.equal(t, theta) and all(torch.equal(opt.state[t][k], v) for k, v in state.items())


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_are_cached_readdressed_and_rebuilt(backend, planned, monkeypatch):
    """The table is reused while the storages are the same; new storages of params of the same shapes (new grads
    after zero_grad) get new address tables over the same block map (tables.with_addresses, from readdress on the
    full path and from the step plan); params of new shapes get a new table. With the step plan, and without it (the
    full path's own cache, which the plan would otherwise hide). The steps after each change match the reference's:
    the table points at this step's tensors."""
    from fused_optim import tables
    builds, moves = [], []
    real_build, real_move = tables.TensorTable.build.__func__, tables.with_addresses
    monkeypatch.setattr(tables.TensorTable, "build",
                        classmethod(lambda cls, *a, **k: builds.append(1) or real_build(cls, *a, **k)))
    # every readdress (the full path's readdress, the step plan's moved_table) ends in with_addresses
    monkeypatch.setattr(tables, "with_addresses", lambda *a, **k: moves.append(1) or real_move(*a, **k))
    a, b = ([torch.randn(n, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(n)).requires_grad_()
             for n in (6, 4)] for _ in range(2))
    opt, ref = fused_optim.FusedAdamW(a, backend=backend), fused_optim.FusedAdamW(b, backend="reference")
    if not planned:
        opt._planned_buckets = lambda: None
    grads = [torch.randn(p.shape, device=DEVICE) for p in a]
    for pa, pb, g in zip(a, b, grads):
        pa.grad, pb.grad = g, g.clone()
    for _ in range(2):
        opt.step()
        ref.step()
    assert (len(builds), len(moves)) == (1, 0), "same storages: the table is reused"
    table = next(iter(opt._tables.values()))
    kept = [p.grad for p in a]
    opt.zero_grad(set_to_none=True)
    for pa, pb in zip(a, b):
        pa.grad = torch.randn(pa.shape, device=DEVICE)  # new storage (the old grads are still alive)
        pb.grad = pa.grad.clone()
    opt.step()
    ref.step()
    assert (len(builds), len(moves)) == (1, 1), "new grad storage: the table is readdressed"
    moved = next(iter(opt._tables.values()))
    assert moved is not table and moved.block_tensor is table.block_tensor, "the block map is kept"
    assert moved.ptrs["grad"].tolist() == [p.grad.data_ptr() for p in a]
    assert_same(a, b, opt, ref, 1e-3, 3)  # the readdressed table reads this step's grads
    del kept
    for p in (a[0], b[0]):  # the same elements as another shape: a new map (here the same blocks, a new table)
        p.data = p.data.view(2, 3)
        p.grad = torch.ones(2, 3, device=DEVICE)
    for t in (opt.state[a[0]], ref.state[b[0]]):
        t["exp_avg"], t["exp_avg_sq"] = t["exp_avg"].view(2, 3), t["exp_avg_sq"].view(2, 3)
    opt.step()
    ref.step()
    assert (len(builds), len(moves)) == (2, 1), "a param of a new shape: a new table"
    assert_same(a, b, opt, ref, 1e-3, 4)


def _errors():
    cases = {}
    emb = torch.randn(10, 3, device=DEVICE).requires_grad_()
    cases["sparse"] = (emb, torch.sparse_coo_tensor([[1, 2]], torch.ones(2, 3), (10, 3),
                                                     check_invariants=True).to(DEVICE), "sparse gradient")
    base = torch.randn(4, 12, device=DEVICE)
    gappy = torch.nn.Parameter(base[:, ::2])  # every other column: gaps in memory
    cases["param with gaps"] = (gappy, torch.randn(12, 4, device=DEVICE).t()[:, ::2],
                               r"is a strided view with gaps or overlaps.*\.clone\(\)")
    cases["grad laid out unlike"] = (torch.nn.Parameter(torch.randn(6, 4, device=DEVICE)), base[:, :6].t(),
                                    r"the grad of .* is laid out unlike its param.*torch.empty_like\(param\)")
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sparse", "param with gaps", "grad laid out unlike"])
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


_MASTER_OPTS = {
    "adamw": lambda params, backend: fused_optim.FusedAdamW(params, lr=1e-2, master_weights=True, backend=backend),
    "lamb": lambda params, backend: fused_optim.FusedLAMB(params, lr=1e-2, master_weights=True, backend=backend),
    "adafactor": lambda params, backend: fused_optim.FusedAdafactor(params, beta1=0.9, master_weights=True,
                                                                    backend=backend),
}


@pytest.mark.parametrize("first", ["with-master", "without-master"])
@pytest.mark.parametrize("rule", sorted(_MASTER_OPTS))
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_master_weights_switched_mid_run(backend, rule, first):
    """``master_weights`` may change between steps (a state option): turned off, every master_param of a param
    with a grad goes and the param goes on from its value (its master rounded); turned on, every param with a
    grad gets one, a copy of the param. A launch group never mixes params with and without one: the kernels take
    "master weights" per launch. (Before, the masters stayed, a launch took the first param's answer for all, and
    triton read a null address, a crash, or a master was skipped.) Param A has a grad from step 0, so it has a
    master before the switch and B has none; ``first``: which of them leads the group. The update itself is the
    parity tests' business; here AdamW's moments, which depend on the grads alone (exact in fp32: bf16 grads),
    are also compared with the reference run's, bitwise."""
    def run(be):
        a, b = (torch.nn.Parameter(torch.randn(40, generator=torch.Generator().manual_seed(i)).to(DEVICE)
                                   .bfloat16()) for i in (1, 2))
        opt = _MASTER_OPTS[rule]([a, b] if first == "with-master" else [b, a], be)
        for k in range(6):
            if k in (2, 4):
                opt.param_groups[0]["master_weights"] = k == 4
            before = {p: p.detach().clone() for p in (a, b)}
            for p, seed in ((a, k), (b, 10 + k)):
                p.grad = (None if p is b and k < 2 else
                          torch.randn(40, generator=torch.Generator().manual_seed(seed)).to(DEVICE).bfloat16())
            opt.step()
            for p in (a, b):
                if p.grad is None:
                    continue
                state = opt.state[p]
                if 2 <= k < 4:
                    assert "master_param" not in state, f"step {k}: a master_param with master_weights off"
                else:
                    master = state["master_param"]
                    assert torch.equal(p.detach(), master.to(torch.bfloat16)), f"step {k}: param is not its master"
                    if k == 4:  # created this step from the param, then updated with it
                        assert not torch.equal(master, before[p].float()), f"step {k}: master not updated"
        return a, b, opt

    got = run(backend)
    if backend == "reference" or rule != "adamw":
        return
    want = run("reference")
    for name, p, q in (("A", got[0], want[0]), ("B", got[1], want[1])):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[2].state[p][key], want[2].state[q][key]), f"{key} of param {name}"


def test_a_launch_group_with_and_without_master_weights_is_an_error():
    """The kernels read master_param for every tensor of a launch or for none (tables.ALL_OR_NONE): a mix (which
    the optimizer's state init never makes) is refused before a table is built, naming both params."""
    from fused_optim.tables import TensorTable
    params = [torch.zeros(4, dtype=torch.bfloat16) for _ in range(3)]
    operands = {"param": params, "grad": [torch.zeros_like(p) for p in params],
                "master_param": [torch.zeros(4), None, torch.zeros(4)]}
    where = lambda i: f"param {i} of param group 0"  # noqa: E731
    with pytest.raises(ValueError, match="param 0 of param group 0 has optimizer state 'master_param' but param 1 "
                                         "of param group 0 of the same launch group has none"):
        TensorTable.build(operands, torch.device("cpu"), where=where)
    operands["master_param"] = [None, None, None]
    TensorTable.build(operands, torch.device("cpu"), where=where)  # none: fine


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_a_param_listed_twice_is_refused(backend):
    """torch.optim warns of a param listed twice in a group (and will refuse it); a fused launch would update it
    twice, racing on a GPU (the native CPU engine took one update and counted one step where torch counts two).
    Refused when the group is added, on every backend; the group is not added."""
    p, q = torch.nn.Parameter(torch.zeros(4, device=DEVICE)), torch.nn.Parameter(torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match=r"FusedAdamW: param group 0 lists the same param twice \(at 0 and 2\)"):
        fused_optim.FusedAdamW([p, q, p], backend=backend)
    opt = fused_optim.FusedLAMB([p], backend=backend)
    with pytest.raises(ValueError, match=r"FusedLAMB: param group 1 lists the same param twice \(at 0 and 1\)"):
        opt.add_param_group(dict(params=[q, q]))
    assert len(opt.param_groups) == 1
