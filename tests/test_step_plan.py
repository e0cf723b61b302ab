"""The step plan (FusedOptimizer._planned_buckets): a step reuses the last step's buckets, operand lists and table
after re-reading everything they depend on. Each test changes one thing between two steps and checks two facts:

* the result is bitwise what the full path gives: a twin optimizer with the plan switched off gets the same
  changes, and params and every state tensor must be equal (the native CPU kernels are elementwise per tensor and
  LAMB's and Adafactor's reductions are deterministic, so equal inputs give equal bits);
* the plan was reused where nothing it depends on changed and dropped where something did (the full path's
  ``_collect`` is counted), so a plan that is never used, or never dropped, fails here.
"""
import pytest
import torch

import fused_optim
from fused_optim import backends

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(backends.unusable("native", CPU) is not None,
                                reason=f"native CPU backend unavailable: {backends.unusable('native', CPU)}")



@pytest.fixture(autouse=True, params=["C", "python"])
def plan_check(request, monkeypatch):
    """Every test runs with the step plan's per-tensor check in C (the extension's plan_match, what runs whenever
    the extension is there) and in Python (optimizer._plan_match_py, what runs without it)."""
    if request.param == "python":
        monkeypatch.setattr(fused_optim.native, "plan_match", lambda: None)
    else:
        assert fused_optim.native.plan_match() is not None
    return request.param


SHAPES = [(6, 6), (7,), (3, 5), (1,), (4, 4), (2, 3, 4)]
FACTORIES = {
    "adamw": lambda params: fused_optim.FusedAdamW(params, lr=1e-2, backend="native"),
    "lamb": lambda params: fused_optim.FusedLAMB(params, lr=1e-2, backend="native", max_grad_norm=1.0),
    "adafactor": lambda params: fused_optim.FusedAdafactor(params, beta1=0.9, backend="native"),
}


def _make(factory, planned: bool):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(SHAPES)]
    opt = factory(params)
    opt.collects = 0
    collect = opt._collect

    def counted():
        opt.collects += 1
        return collect()

    opt._collect = counted
    if not planned:
        opt._planned_buckets = lambda: None
    return opt, params


def _grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _twins(change, factory=FACTORIES["adamw"], steps: int = 4, at: int = 2):
    """``steps`` steps of a planned optimizer and of its unplanned twin, ``change(opt, params)`` called on both
    before step ``at``. Asserts bitwise equality; returns the planned run's (opt, params, collects) with collects
    = [full-path steps before the change, after the changed step, at the end]."""
    runs = []
    for planned in (True, False):
        opt, params = _make(factory, planned)
        counts = []
        for step in range(steps):
            _grads(params, step)
            if step == at:
                counts.append(opt.collects)
                change(opt, params)
            opt.step()
            if step == at:
                counts.append(opt.collects)
        counts.append(opt.collects)
        runs.append((opt, params, counts))
    (a, pa, counts), (b, pb, _) = runs
    assert len(a.param_groups) == len(b.param_groups)
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"param {i}"
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys(), f"state keys of param {i}"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"state {k!r} of param {i}"
    return a, pa, counts


KEEPS, DROPS = [1, 1, 1], [1, 2, 2]  # collects: the plan kept through the change / dropped once, then rebuilt


@pytest.mark.parametrize("rule", sorted(FACTORIES))
def test_unchanged_steps_reuse_the_plan(rule):
    _, _, counts = _twins(lambda opt, params: None, FACTORIES[rule])
    assert counts == KEEPS


@pytest.mark.parametrize("rule", sorted(FACTORIES))
def test_new_grad_objects_keep_the_plan(rule):
    def regrad(opt, params):  # zero_grad(set_to_none=True) + backward: new grad tensors
        opt.zero_grad(set_to_none=True)
        _grads(params, 7)

    _, _, counts = _twins(regrad, FACTORIES[rule])
    assert counts == KEEPS


def test_grads_at_new_addresses_rebuild_the_table_only():
    tables = []

    def move(opt, params):
        tables.append(next(iter(opt._tables.values())))
        keep = [p.grad for p in params]  # held, so the new grads cannot reuse their memory
        for p in params:
            p.grad = p.grad.clone()
        tables.append(keep)

    opt, _, counts = _twins(move)
    assert counts == KEEPS
    assert next(iter(opt._tables.values())) is not tables[0]


def test_param_storage_swapped_rebuilds_the_table_only():
    seen = []

    def swap(opt, params):
        seen.append((next(iter(opt._tables.values())), params[2].data))  # the old storage stays alive
        params[2].data = params[2].data.clone()

    opt, params, counts = _twins(swap)
    assert counts == KEEPS
    assert next(iter(opt._tables.values())) is not seen[0][0]
    assert not torch.equal(params[2].data, seen[0][1])  # the new storage was updated, the old one left alone


def test_replaced_state_tensor_is_the_one_updated():
    runs = []  # one entry per twin, the planned one first

    def replace(opt, params):
        old = opt.state[params[0]]["exp_avg"]
        opt.state[params[0]]["exp_avg"] = new = old.clone()
        runs.append(dict(old=old, new=new, before=old.clone()))

    opt, params, counts = _twins(replace)
    replaced = runs[0]
    assert counts == KEEPS
    assert opt.state[params[0]]["exp_avg"] is replaced["new"]
    assert torch.equal(replaced["old"], replaced["before"])  # the dropped tensor is no longer written
    assert not torch.equal(replaced["new"], replaced["before"])


@pytest.mark.parametrize("change", [
    "grad_none", "state_key_deleted", "state_dict_replaced", "amsgrad_on", "backend_reference",
    "param_removed", "lr_tensor",
])
def test_changes_drop_the_plan(change):
    def apply(opt, params):
        group = opt.param_groups[0]
        if change == "grad_none":
            params[1].grad = None
        elif change == "state_key_deleted":
            del opt.state[params[3]]["exp_avg_sq"]
        elif change == "state_dict_replaced":
            opt.state[params[4]] = {}
        elif change == "amsgrad_on":
            group["amsgrad"] = True
        elif change == "backend_reference":
            group["backend"] = "reference"
        elif change == "param_removed":
            group["params"].pop()
        elif change == "lr_tensor":
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)

    opt, params, counts = _twins(apply)
    # The reference backend never plans (its buckets always take the full path); a grad given back at the next
    # step changes the plan once more.
    assert counts == ([1, 2, 3] if change in ("backend_reference", "grad_none") else DROPS)
    if change == "amsgrad_on":
        assert all("max_exp_avg_sq" in opt.state[p] for p in params)


def test_add_param_group_drops_the_plan():
    def add(opt, params):
        extra = torch.nn.Parameter(torch.ones(5))
        extra.grad = torch.full((5,), 0.5)
        opt.add_param_group({"params": [extra], "lr": 1e-3})
        params.append(extra)

    opt, params, counts = _twins(add)
    assert counts == DROPS
    assert not torch.equal(params[-1], torch.ones(5))


def test_transposed_param_is_refused_untouched():
    opt, params = _make(FACTORIES["adamw"], planned=True)
    _grads(params, 0)
    opt.step()
    params[0].data = params[0].data.t()  # same address and shape, no longer contiguous
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[1]].items()}
    with pytest.raises(RuntimeError, match=r"param 0 of param group 0 has a non-contiguous param"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in state.items())


def test_sparse_grad_is_refused_after_planned_steps():
    opt, params = _make(FACTORIES["adamw"], planned=True)
    _grads(params, 0)
    opt.step()
    opt.step()
    assert opt.collects == 1
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="has a sparse gradient"):
        opt.step()


def test_load_state_dict_drops_the_plan():
    opt, params = _make(FACTORIES["adamw"], planned=True)
    _grads(params, 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt._plan is None
    opt.step()
    assert opt.collects == 2


@pytest.mark.parametrize("rule", ["adamw", "lamb"])
def test_planned_native_launches_pass_no_tensor_lists(rule):
    """A planned step hands the native operator its table alone (csrc/ops_common.h, TablesOnly); the full path and
    a step whose table was rebuilt pass the lists, which the operator checks. (That both give the bits of the full
    path is what the twin tests above check: their planned steps are table-only launches.)"""
    from fused_optim import native

    op = {"adamw": torch.ops.fused_optim.adam_, "lamb": torch.ops.fused_optim.lamb_}[rule]
    seen = []  # per step: the params-list lengths of the rule's launches
    launch = native._launch

    def spy(fn, *args):
        if fn is op:
            seen[-1].append(len(args[0]))
        launch(fn, *args)

    def move_grads(opt, params):  # new addresses: the table is rebuilt, the lists are passed once
        keep = [p.grad for p in params]
        for p in params:
            p.grad = p.grad.clone()
        seen.append(keep)

    native._launch = spy
    try:
        opt, params = _make(FACTORIES[rule], planned=True)
        lengths = []
        _grads(params, 0)
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for p in params:  # new values at the same addresses (new grad objects may land elsewhere)
                p.grad.copy_(torch.randn(p.shape, generator=gen))
            if step == 3:
                move_grads(opt, params)
            seen.append([])
            opt.step()
            lengths.append(sorted(set(seen[-1])))
    finally:
        native._launch = launch
    n = len(SHAPES)
    assert lengths == [[n], [0], [0], [n], [0]]


def test_table_only_launch_arguments_are_checked():
    """param_dtype (a table-only launch) takes every list empty; grad_dtype and master come only with it."""
    from fused_optim import native

    opt, params = _make(FACTORIES["adamw"], planned=True)
    _grads(params, 0)
    opt.step()
    for p in params:
        p.grad.mul_(0.5)  # same addresses: the next step is planned on the same table
    captured = []
    launch = native._launch
    native._launch = lambda fn, *args: captured.append(args)
    try:
        opt.step()  # planned: table-only
    finally:
        native._launch = launch
    (args,) = captured
    assert args[0] == [] and args[-3:] == (torch.float32, torch.float32, False)
    op = torch.ops.fused_optim.adam_
    with pytest.raises(RuntimeError, match="table-only launch .* takes every tensor list empty"):
        op(list(params), *args[1:])
    with pytest.raises(RuntimeError, match="grad_dtype and master describe a table-only launch"):
        op(*args[:-3], None, torch.float32, False)
    with pytest.raises(RuntimeError, match="param_dtype without grad_dtype"):
        op(*args[:-3], torch.float32, None, False)
    with pytest.raises(RuntimeError, match="param_dtype has dtype Long"):
        op(*args[:-3], torch.int64, torch.float32, False)
    before = [p.clone() for p in params]
    op(*args)  # the captured table-only launch, run by hand: it updates the params
    assert not any(torch.equal(a, b) for a, b in zip(before, params))


def _match_cases():
    """(name, args of plan_match, expected result): one case per thing the check reads."""
    from fused_optim.optimizer import _CHANGED, _MATCH, _MOVED
    f32, bf16 = torch.float32, torch.bfloat16
    ps = [torch.zeros(2, 3), torch.zeros(4)]
    gs = [torch.zeros(2, 3), torch.zeros(4)]
    ms = [torch.zeros(2, 3), None]  # a nullable state list: the second param has none
    shapes = [p.shape for p in ps]

    def addresses(*lists):
        return [0 if t is None else t.data_ptr() for lst in lists for t in lst]

    base = addresses(ps, gs, ms)
    moved_grad = torch.zeros(4)
    cases = [
        ("match", ([ps, gs, ms], [False, False, True], f32, f32, base, shapes), _MATCH),
        ("grad at a new address", ([ps, [gs[0], moved_grad], ms], [False, False, True], f32, f32, base, shapes),
         _MOVED),
        ("state where the table had none", ([ps, gs, [ms[0], torch.zeros(4)]], [False, False, True], f32, f32, base,
                                            shapes), _MOVED),
        ("param dtype", ([ps, gs, ms], [False, False, True], bf16, f32, base, shapes), _CHANGED),
        ("grad dtype", ([ps, gs, ms], [False, False, True], f32, bf16, base, shapes), _CHANGED),
        ("param shape, same numel", ([ps, gs, ms], [False, False, True], f32, f32, base,
                                     [torch.Size([3, 2]), shapes[1]]), _CHANGED),
        ("non-contiguous grad", ([ps, [gs[0].t(), gs[1]], ms], [False, False, True], f32, f32,
                                 addresses(ps, [gs[0].t(), gs[1]], ms), shapes), _CHANGED),
        ("non-contiguous param", ([[ps[0].t(), ps[1]], gs, ms], [False, False, True], f32, f32,
                                  addresses([ps[0].t(), ps[1]], gs, ms), [torch.Size([3, 2]), shapes[1]]), _CHANGED),
        ("None in a list that may not hold one", ([ps, gs, ms], [False, False, False], f32, f32, base, shapes),
         _CHANGED),
        ("a missing grad", ([ps, [gs[0], None], ms], [False, False, True], f32, f32, base, shapes), _CHANGED),
        ("a non-tensor", ([ps, gs, [ms[0], 1.0]], [False, False, True], f32, f32, base, shapes), _CHANGED),
        ("sparse grad", ([ps, [gs[0], torch.zeros(4).to_sparse()], ms], [False, False, True], f32, f32, base,
                         shapes), _CHANGED),
        ("a list of another length", ([ps, gs, ms[:1]], [False, False, True], f32, f32, base, shapes), _CHANGED),
        ("too few addresses", ([ps, gs, ms], [False, False, True], f32, f32, base[:-1], shapes), _CHANGED),
        ("one list only", ([ps], [False], f32, f32, addresses(ps), shapes), _CHANGED),
    ]
    return cases


def test_plan_checks_in_c_and_python_agree(plan_check):
    """The per-tensor check of the step plan, on a case per thing it reads: the extension's plan_match and its
    Python statement give the expected result, so the plan tests above, which run with each, test the same rule."""
    from fused_optim.optimizer import _plan_match_py
    match = fused_optim.native.plan_match() if plan_check == "C" else _plan_match_py
    found = {name: match(*args) for name, args, _ in _match_cases()}
    assert found == {name: expected for name, _, expected in _match_cases()}


def test_plan_match_refuses_wrong_argument_types():
    match = fused_optim.native.load().plan_match  # the extension's (the Python check takes any sequences)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        match([], [])
    with pytest.raises(TypeError, match="param_dtype: torch.dtype"):
        match([], [], "float32", torch.float32, [], [])
