"""The step plan (FusedOptimizer._planned_buckets): a step reuses the last step's buckets, operand lists and table
after re-reading everything they depend on. Each test changes one thing between two steps and checks two facts:

* the result is bitwise what the full path gives: a twin optimizer with the plan switched off gets the same
  changes, and params and every state tensor must be equal (the native CPU kernels are elementwise per tensor and
  LAMB's and Adafactor's reductions are deterministic, so equal inputs give equal bits);
* the plan was reused where nothing it depends on changed and dropped where something did (the full path's
  ``_collect`` is counted), so a plan that is never used, or never dropped, fails here.
"""
from array import array

import pytest
import torch

import fused_optim
from fused_optim import backends
from fused_optim.optimizer import _State

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


def _make(factory, planned: bool, dtype=torch.float32):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype))
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
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _twins(change, factory=FACTORIES["adamw"], steps: int = 4, at: int = 2, dtype=torch.float32):
    """``steps`` steps of a planned optimizer and of its unplanned twin, ``change(opt, params)`` called on both
    before step ``at``. Asserts bitwise equality; returns the planned run's (opt, params, collects) with collects
    = [full-path steps before the change, after the changed step, at the end]."""
    runs = []
    for planned in (True, False):
        opt, params = _make(factory, planned, dtype)
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


def test_a_tensor_on_another_device_takes_the_full_path(monkeypatch):
    """A tensor moved to another device (``p.data = p.data.cpu()``) has a new address too, and a table must not take
    it: plan_match reads every tensor's device against the bucket's (the cases of _match_cases). Here its wiring:
    the bucket's device is what the check is given, and a check that finds the tensors on another device (every
    call here is given the meta device) sends every step through the full path, with the same results."""
    from fused_optim import optimizer
    real = fused_optim.native.plan_match() or optimizer._plan_match_py  # C or Python, as the fixture chose
    given = []

    def elsewhere(*args):
        given.append(args[11])
        return real(*args[:11], torch.device("meta"))

    monkeypatch.setattr(fused_optim.native, "plan_match", lambda: elsewhere)
    monkeypatch.setattr(optimizer, "_plan_match_py", elsewhere)
    _, _, counts = _twins(lambda opt, params: None)
    assert counts == [2, 3, 4]  # every step took the full path (with the real device: KEEPS, [1, 1, 1])
    assert given and all(d == torch.device("cpu") for d in given)


def test_param_storage_swapped_rebuilds_the_table_only():
    seen = []

    def swap(opt, params):
        old = params[2].data  # kept alive, so that its memory is not handed to the new storage
        seen.append((next(iter(opt._tables.values())), old, old.clone()))
        params[2].data = old.clone()

    opt, params, counts = _twins(swap)
    assert counts == KEEPS
    table, old, old_values = seen[0]
    assert next(iter(opt._tables.values())) is not table
    assert torch.equal(old, old_values)  # the old storage is no longer written
    assert not torch.equal(params[2].data, old)  # the new one is


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
    "param_removed", "lr_tensor", "group_replaced", "param_replaced",
    # every way to change which state dict a param maps to (optimizer._State counts them instead of a lookup)
    "state_updated", "state_ior", "state_setdefault", "state_entry_deleted", "state_entry_popped", "state_popitem",
    "state_cleared",
])
def test_changes_drop_the_plan(change):
    def apply(opt, params):
        group = opt.param_groups[0]
        state = opt.state
        if change == "grad_none":
            params[1].grad = None
        elif change == "state_key_deleted":
            del state[params[3]]["exp_avg_sq"]
        elif change == "state_dict_replaced":
            state[params[4]] = {}
        elif change == "state_updated":
            state.update({params[4]: {}})
        elif change == "state_ior":
            state |= {params[4]: {}}
        elif change == "state_setdefault":  # the only change setdefault can make: a param's entry gone, then added
            dict.__delitem__(state, params[4])  # (dict's own, so that only setdefault is counted)
            state.setdefault(params[4], {})
        elif change == "state_entry_deleted":
            del state[params[4]]
        elif change == "state_entry_popped":
            state.pop(params[4])
        elif change == "state_popitem":
            state.popitem()
        elif change == "state_cleared":
            state.clear()
        elif change == "amsgrad_on":
            group["amsgrad"] = True
        elif change == "backend_reference":
            group["backend"] = "reference"
        elif change == "param_removed":
            group["params"].pop()
        elif change == "group_replaced":  # a new dict in its place (the plan's bucket would read the old one's lr)
            opt.param_groups[0] = {**group, "lr": 0.5}
        elif change == "param_replaced":  # another tensor of the same shape in the group, taking its grad
            new = torch.nn.Parameter(params[0].detach() * 2)
            new.grad = params[0].grad
            group["params"][0] = params[0] = new
        elif change == "lr_tensor":
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)

    opt, params, counts = _twins(apply)
    # The reference backend never plans (its buckets always take the full path); a grad given back at the next
    # step changes the plan once more.
    assert counts == ([1, 2, 3] if change in ("backend_reference", "grad_none") else DROPS)
    if change == "amsgrad_on":
        assert all("max_exp_avg_sq" in opt.state[p] for p in params)


# (rule, option, value): every option of a class's state_options, changed to one that adds a state
STATE_OPTION_CHANGES = [("adamw", "amsgrad", True), ("adamw", "master_weights", True),
                        ("lamb", "master_weights", True), ("adafactor", "master_weights", True),
                        ("adafactor", "beta1", 0.9)]


@pytest.mark.parametrize("rule,option,value", STATE_OPTION_CHANGES)
def test_state_options_drop_the_plan(rule, option, value):
    """A group option that decides which state a param has (state_options), changed between steps, drops the plan,
    and lazy state init adds the state: bf16 params get their master weights, Adafactor its momentum, AdamW its
    max_exp_avg_sq (bitwise the full path's, as every twin)."""
    factory = {"adafactor": lambda ps: fused_optim.FusedAdafactor(ps, backend="native")}.get(rule, FACTORIES[rule])

    def change(opt, params):
        opt.param_groups[0][option] = value

    opt, params, counts = _twins(change, factory, dtype=torch.bfloat16)
    assert counts == DROPS
    key = {"master_weights": "master_param", "beta1": "exp_avg", "amsgrad": "max_exp_avg_sq"}[option]
    assert all(key in opt.state[p] for p in params)


def test_every_state_option_is_changed_by_a_test():
    classes = {"adamw": fused_optim.FusedAdamW, "lamb": fused_optim.FusedLAMB, "adafactor": fused_optim.FusedAdafactor}
    assert {(r, o) for r, o, _ in STATE_OPTION_CHANGES} == {(r, o) for r, c in classes.items() for o in c.state_options}


def test_planned_steps_look_up_no_state_unless_the_mapping_was_replaced(monkeypatch):
    """A planned step checks the state dicts by the _State's change count, hashing no param; a mapping put in its
    place (here a plain defaultdict holding the same dicts) is looked up param by param, and the plan holds."""
    from collections import defaultdict

    opt, params = _make(FACTORIES["adamw"], planned=True)
    _grads(params, 0)
    opt.step()
    hashed = []
    tensor_hash = torch.Tensor.__hash__
    monkeypatch.setattr(torch.Tensor, "__hash__", lambda t: hashed.append(t) or tensor_hash(t))
    opt.step()
    assert (opt.collects, hashed) == (1, [])
    opt.state = defaultdict(dict, opt.state)
    opt.step()
    assert opt.collects == 1 and {id(t) for t in hashed} == {id(p) for p in params}


def test_copied_and_pickled_optimizers_plan_their_own_state():
    """deepcopy and pickle keep the state a _State, and the copy's planned steps (planned on its own state) update
    the copy's tensors alone, bitwise as the original's."""
    import copy
    import pickle

    opt, params = _make(FACTORIES["adamw"], planned=True)
    for step in range(2):
        _grads(params, step)
        opt.step()
    del opt._collect  # the counting wrapper is a closure: not picklable
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for twin in copies:
        assert type(twin.state) is _State
    for step in range(2, 5):
        for o in [opt, *copies]:
            _grads(o.param_groups[0]["params"], step)
            o.step()
    for twin in copies:
        assert twin._plan is not None and twin._plan_state[0] is twin.state  # planned on its own _State
        for x, y in zip(params, twin.param_groups[0]["params"]):
            assert x is not y and torch.equal(x, y)
            assert all(torch.equal(opt.state[x][k], twin.state[y][k]) for k in opt.state[x])


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
    params[0].data = params[0].data.t()  # same address and shape, column-major: its grad is not laid out like it
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[1]].items()}
    with pytest.raises(RuntimeError, match=r"the grad of param 0 of param group 0 is laid out unlike its param"):
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
    assert type(opt.state) is _State  # torch's load_state_dict put a plain defaultdict there; __setstate__ wraps it
    opt.step()
    assert opt.collects == 2


@pytest.mark.parametrize("rule", sorted(FACTORIES))
def test_planned_native_launches_pass_no_tensor_lists(rule):
    """A planned step hands the native operators their tables alone (csrc/ops_common.h, TablesOnly; Adafactor's
    passes: csrc/adafactor_ops.h), also a step whose tensors moved, with the addresses the plan's check read
    (tables.with_addresses); the full path passes the lists, which the operators check. (That both give the bits
    of the full path is what the twin tests above check: their planned steps are table-only launches.)"""
    from fused_optim import native

    ops = torch.ops.fused_optim
    n, matrices = len(SHAPES), sum(len(s) >= 2 for s in SHAPES)
    # Per operator of the rule, the length of its first tensor list in a launch with lists. FusedLAMB's
    # max_grad_norm (FACTORIES) adds grad_sq_, the grads' pass of the global norm. Adafactor's statistics pass
    # takes the matrices' row states first.
    full = {"adamw": {ops.adam_: n}, "lamb": {ops.lamb_: n, ops.grad_sq_: n},
            "adafactor": {ops.adafactor_pass1_: n, ops.adafactor_statistics_: matrices, ops.adafactor_pass2_: n,
                          ops.adafactor_pass3_: n}}[rule]
    seen = []  # per step: (operator, length of its first tensor list) of the rule's launches
    launch = native._launch

    def spy(fn, *args):
        if fn in full:
            seen[-1].append((str(fn), len(args[0])))
        launch(fn, *args)

    def move_grads(opt, params):  # new addresses: the table takes them, no lists are passed
        keep = [p.grad for p in params]
        for p in params:
            p.grad = p.grad.clone()
        seen.append(keep)
        return next(iter(opt._tables.values()))

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
                before = move_grads(opt, params)
            seen.append([])
            opt.step()
            lengths.append(sorted(set(seen[-1])))
            if step == 3:
                table = next(iter(opt._tables.values()))
                assert table is not before and table.ptrs["grad"].tolist() == [p.grad.data_ptr() for p in params]
    finally:
        native._launch = launch
    with_lists = sorted((str(op), k) for op, k in full.items())
    table_only = sorted((str(op), 0) for op in full)
    assert lengths == [with_lists, table_only, table_only, table_only, table_only]


@pytest.mark.parametrize("rule", sorted(FACTORIES))
def test_planned_steps_with_master_weights_match_the_full_path(rule):
    """bf16 params with fp32 master weights (and Adafactor without momentum): the table-only launches of planned
    steps state param_dtype, grad_dtype and master instead of passing lists, and give bitwise the full path's
    params and state."""
    kwargs = {"adamw": {}, "lamb": {"max_grad_norm": 1.0}, "adafactor": {"beta1": None}}[rule]
    cls = {"adamw": fused_optim.FusedAdamW, "lamb": fused_optim.FusedLAMB, "adafactor": fused_optim.FusedAdafactor}
    from fused_optim import native

    runs, lists = [], []  # lists: the tensor lists of the planned twin's last step (operators that take lists)
    launch = native._launch
    for planned in (True, False):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).bfloat16())
                  for i, s in enumerate(SHAPES)]
        opt = cls[rule](params, backend="native", master_weights=True, **kwargs)
        if not planned:
            opt._planned_buckets = lambda: None
        for step in range(5):
            gen = torch.Generator().manual_seed(100 + step)
            for p in params:  # new values at the same addresses: the planned steps keep their table
                g = torch.randn(p.shape, generator=gen).bfloat16()
                p.grad = g if p.grad is None else p.grad.copy_(g)
            if planned and step == 4:
                native._launch = lambda fn, *args: lists.append(args[0]) or launch(fn, *args)
            try:
                opt.step()
            finally:
                native._launch = launch
        runs.append((opt, params))
    (a, pa), (b, pb) = runs
    tensor_lists = [x for x in lists if isinstance(x, list)]
    assert tensor_lists and not any(tensor_lists)  # the last planned step: table-only launches
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"param {i}"
        assert a.state[x].keys() == b.state[y].keys() and "master_param" in a.state[x]
        for k in a.state[x]:
            assert torch.equal(a.state[x][k], b.state[y][k]), f"state {k!r} of param {i}"


def _captured_planned_step(rule):
    """A ``rule`` optimizer after one step, and the native launches ``(operator, args)`` of its second, planned step
    (table-only), captured and not run."""
    from fused_optim import native

    opt, params = _make(FACTORIES[rule], planned=True)
    _grads(params, 0)
    opt.step()
    for p in params:
        p.grad.mul_(0.5)  # same addresses: the next step is planned on the same table
    captured = []
    launch = native._launch
    native._launch = lambda fn, *args: captured.append((fn, args))
    try:
        opt.step()
    finally:
        native._launch = launch
    return opt, params, captured


def test_table_only_launch_arguments_are_checked():
    """param_dtype (a table-only launch) takes every list empty; grad_dtype and master come only with it."""
    _, params, [(_, args)] = _captured_planned_step("adamw")
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
    with pytest.raises(RuntimeError, match="adam_: master=True was given for float32 params"):
        op(*args[:-3], torch.float32, torch.float32, True)
    before = [p.clone() for p in params]
    op(*args)  # the captured table-only launch, run by hand: it updates the params
    assert not any(torch.equal(a, b) for a, b in zip(before, params))


def test_table_only_adafactor_launch_arguments_are_checked():
    """Adafactor's passes: the dtypes (pass 1 and 3: param_dtype, grad_dtype, master; pass 2: grad_dtype) or, for the
    statistics, tables_only make a table-only launch, which takes every list empty; the captured launches of a
    planned step, run by hand, do that step."""
    opt, params, captured = _captured_planned_step("adafactor")
    ops = torch.ops.fused_optim
    args = {fn: a for fn, a in captured}
    p1, st, p2, p3 = (args[op] for op in (ops.adafactor_pass1_, ops.adafactor_statistics_, ops.adafactor_pass2_,
                                          ops.adafactor_pass3_))
    assert p1[-3:] == p3[-3:] == (torch.float32, torch.float32, False) and p2[-1] is torch.float32 and st[-1] is True
    assert not any(p1[:3]) and not any(st[:3]) and not any(p2[:3]) and not any(p3[:6])
    grads = [p.grad for p in params]
    only = "a table-only launch \\({}\\) takes every tensor list empty"
    with pytest.raises(RuntimeError, match="adafactor_pass1_: " + only.format("param_dtype given")):
        ops.adafactor_pass1_(list(params), *p1[1:])
    with pytest.raises(RuntimeError, match="adafactor_pass1_: grad_dtype and master describe a table-only launch"):
        ops.adafactor_pass1_(*p1[:-3], None, torch.float32, False)
    with pytest.raises(RuntimeError, match="adafactor_pass3_: param_dtype without grad_dtype"):
        ops.adafactor_pass3_(*p3[:-3], torch.float32, None, False)
    with pytest.raises(RuntimeError, match="adafactor_pass3_: master=True was given for float32 params"):
        ops.adafactor_pass3_(*p3[:-3], torch.float32, torch.float32, True)
    with pytest.raises(RuntimeError, match="adafactor_statistics_: " + only.format("tables_only=True")):
        ops.adafactor_statistics_(*st[:2], [opt.state[p]["step"] for p in params], *st[3:])
    with pytest.raises(RuntimeError, match="adafactor_pass2_: " + only.format("grad_dtype given")):
        ops.adafactor_pass2_(grads, *p2[1:])
    with pytest.raises(RuntimeError, match="adafactor_pass2_: grad_dtype has dtype Long"):
        ops.adafactor_pass2_(*p2[:-1], torch.int64)
    with pytest.raises(RuntimeError, match="adafactor_statistics_: steps is empty"):
        ops.adafactor_statistics_(*st[:-1], False)  # empty lists without the flag: a list launch of nothing
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    for fn, a in captured:  # the captured table-only step, run by hand
        fn(*a)
    assert not any(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(opt.state[p]["step"], t + 1) for p, t in zip(params, steps))


def test_table_only_grad_norm_arguments_are_checked():
    """grad_sq_ (FusedLAMB's max_grad_norm) with grad_dtype takes grads empty, and gives the sums of the list launch."""
    from fused_optim import native

    opt, params = _make(FACTORIES["lamb"], planned=True)
    _grads(params, 0)
    opt.step()
    table = next(iter(opt._tables.values()))
    grads = [p.grad for p in params]
    with_lists = native.grad_sq_norm(table, grads)
    table_only = native.grad_sq_norm(table, None, grad_dtype=torch.float32)
    assert torch.equal(with_lists, table_only)  # the same blocks summed in the same order
    partials = torch.empty((1, table.n_blocks))
    head = (table.ptrs["grad"], table.numels, table.block_tensor, table.block_start, table.arrivals, table.block,
            None, None, partials)
    only = "grad_sq_: a table-only launch .grad_dtype given. takes every tensor list empty"
    with pytest.raises(RuntimeError, match=only):
        torch.ops.fused_optim.grad_sq_(grads, *head, torch.float32)
    with pytest.raises(RuntimeError, match="grad_dtype has dtype Long"):
        torch.ops.fused_optim.grad_sq_([], *head, torch.int64)


def _match_cases():
    """(name, args of plan_match, expected result): one case per thing the check reads. Arguments: params, states,
    names, present, param_dtype, grad_dtype, addresses, shapes, state_dtype, numels, found, device,
    dense_layouts (csrc/plan.cpp)."""
    from fused_optim.optimizer import _CHANGED, _MATCH, _MOVED
    f32, bf16 = torch.float32, torch.bfloat16

    def bucket():
        ps = [torch.zeros(2, 3), torch.nn.Parameter(torch.zeros(4))]
        for p in ps:
            p.grad = torch.zeros(p.shape)
        # "exp_avg": every param has one; "max_exp_avg_sq": only the first (present is a tuple)
        states = [{"exp_avg": torch.zeros(2, 3), "max_exp_avg_sq": torch.zeros(2, 3)}, {"exp_avg": torch.zeros(4)}]
        addresses = array("q", [p.data_ptr() for p in ps] + [p.grad.data_ptr() for p in ps]
                          + [s["exp_avg"].data_ptr() for s in states] + [states[0]["max_exp_avg_sq"].data_ptr(), 0])
        numels = array("q", [6, 4, 6, -1])  # -1: the second param has no max_exp_avg_sq
        return [ps, states, ["exp_avg", "max_exp_avg_sq"], [True, (True, False)], f32, f32, addresses,
                [p.shape for p in ps], f32, numels, array("q", [-1] * len(addresses)), torch.device("cpu"), True]

    def case(name, change, expected):
        args = bucket()
        change(args)
        return name, args, expected

    def put(container, key, value):
        container[key] = value

    def regrad(p, g):
        p.grad = g

    def set_data(p, t):
        p.data = t

    class Sub(torch.Tensor):
        pass

    def transposed(a, keep=(), make=lambda: torch.zeros(3, 2).t()):
        """Param 0, its grad and its states (but ``keep``) anew, laid out as ``make()`` (a 2 x 3 tensor)."""
        set_data(a[0][0], make())
        regrad(a[0][0], make())
        for key in ("exp_avg", "max_exp_avg_sq"):
            if key not in keep:
                put(a[1][0], key, make())

    def with_grad(t):
        t.grad = torch.zeros(t.shape, device=t.device)
        return t

    return [
        case("match", lambda a: None, _MATCH),
        case("grad at a new address", lambda a: regrad(a[0][1], torch.zeros(4)), _MOVED),
        case("param at a new address", lambda a: set_data(a[0][0], torch.zeros(2, 3)), _MOVED),
        case("state tensor at a new address", lambda a: put(a[1][1], "exp_avg", torch.zeros(4)), _MOVED),
        case("state where the table had none", lambda a: put(a[1][1], "max_exp_avg_sq", torch.zeros(4)), _CHANGED),
        case("a state gone", lambda a: a[1][0].pop("exp_avg"), _CHANGED),
        case("a state set to None", lambda a: put(a[1][1], "exp_avg", None), _CHANGED),
        case("param dtype", lambda a: put(a, 4, bf16), _CHANGED),
        case("grad dtype", lambda a: put(a, 5, bf16), _CHANGED),
        case("param shape, same numel", lambda a: set_data(a[0][0], a[0][0].data.view(3, 2)), _CHANGED),
        case("grad laid out unlike its param", lambda a: regrad(a[0][0], torch.zeros(3, 2).t()), _CHANGED),
        # a dense param of another layout (column-major): taken when its grad and state are laid out like it
        case("transposed param, its grad and state contiguous", lambda a: set_data(a[0][0], torch.zeros(3, 2).t()),
             _CHANGED),
        case("transposed param, grad and state laid out like it", lambda a: transposed(a), _MOVED),
        case("transposed param, state contiguous", lambda a: transposed(a, ("exp_avg",)), _CHANGED),
        case("transposed param, contiguous params only", lambda a: (transposed(a), put(a, 12, False)), _CHANGED),
        case("param with gaps, grad and state laid out like it", lambda a: transposed(a, make=lambda: torch.zeros(
            2, 6)[:, ::2]), _CHANGED),
        case("a missing grad", lambda a: regrad(a[0][1], None), _CHANGED),
        case("sparse grad", lambda a: regrad(a[0][1], torch.zeros(4).to_sparse()), _CHANGED),
        case("a non-tensor state", lambda a: put(a[1][1], "exp_avg", 1.0), _CHANGED),
        case("a sparse state", lambda a: put(a[1][1], "exp_avg", torch.zeros(4).to_sparse()), _CHANGED),
        case("a state that is not a dict", lambda a: put(a[1], 1, [("exp_avg", torch.zeros(4))]), _CHANGED),
        # a subclass param with a grad (as_subclass alone leaves .grad None, which is CHANGED for another reason)
        case("a tensor subclass param", lambda a: put(a[0], 0, with_grad(a[0][0].detach().as_subclass(Sub))),
             _CHANGED),
        # the grad's storage kept (same address), its shape not: `grad.data = ...` or resize_() bypass autograd
        case("grad resized in place", lambda a: set_data(a[0][1].grad, a[0][1].grad.data[:2]), _CHANGED),
        # a state tensor at its address of the table, but no longer what the kernels read there: a view of another
        # dtype, a shrunk storage, a transposed layout, or the sizes the table expects changed
        case("state of another dtype, same address", lambda a: put(a[1][0], "exp_avg", a[1][0]["exp_avg"].view(
            torch.int32)), _CHANGED),
        case("state resized in place", lambda a: a[1][1]["exp_avg"].resize_(2), _CHANGED),
        case("non-contiguous state, same address", lambda a: put(a[1][0], "exp_avg", a[1][0]["exp_avg"].as_strided(
            (2, 3), (1, 2))), _CHANGED),
        case("state dtype expected", lambda a: put(a, 8, bf16), _CHANGED),
        case("state size expected", lambda a: put(a[9], 2, 5), _CHANGED),
        case("a size for a state a param lacks is not read", lambda a: put(a[9], 3, 7), _MATCH),
        # on another device (moved there: a new address too); torch refuses a grad on another device than its
        # param, so a param moved with its grad
        case("param and grad on another device", lambda a: put(a[0], 0, with_grad(torch.nn.Parameter(
            torch.zeros(2, 3, device="meta")))), _CHANGED),
        case("state on another device", lambda a: put(a[1][1], "exp_avg", torch.zeros(4, device="meta")), _CHANGED),
        case("device expected", lambda a: put(a, 11, torch.device("meta")), _CHANGED),
        case("a list of another length", lambda a: a[1].pop(), _CHANGED),
        case("too few addresses", lambda a: a[6].pop(), _CHANGED),
        case("too few sizes", lambda a: a[9].pop(), _CHANGED),
        case("a found buffer of another length", lambda a: a[10].pop(), _CHANGED),
        case("present of another length", lambda a: put(a[3], 1, (True,)), _CHANGED),
        case("names and present disagree", lambda a: a[3].pop(), _CHANGED),
    ]


def test_plan_checks_in_c_and_python_agree(plan_check):
    """The per-tensor check of the step plan, on a case per thing it reads: the extension's plan_match and its
    Python statement give the expected result (and the grads they read), so the plan tests above, which run with
    each, test the same rule."""
    from fused_optim.optimizer import _CHANGED, _plan_match_py
    match = fused_optim.native.plan_match() if plan_check == "C" else _plan_match_py
    found, expected = {}, {}
    for name, args, result in _match_cases():
        found[name] = match(*args)
        expected[name] = (result, None) if result == _CHANGED else (result, [p.grad for p in args[0]])
        if result != _CHANGED:  # the addresses read, in table order: what a MOVED bucket's table takes
            params, states = args[0], args[1]
            seen = [p.data_ptr() for p in params] + [p.grad.data_ptr() for p in params]
            seen += [s[k].data_ptr() if s.get(k) is not None else 0 for k in args[2] for s in states]
            assert args[10].tolist() == seen, name
    for name in found:  # grads by identity: the check hands back the very grad objects
        got, want = found[name], expected[name]
        assert got[0] == want[0], name
        assert (got[1] is None) == (want[1] is None) and all(map(lambda x, y: x is y, got[1] or [], want[1] or [])), name


def test_plan_match_refuses_wrong_argument_types():
    match = fused_optim.native.load().plan_match  # the extension's (the Python check takes any sequences)
    f32, q, cpu = torch.float32, array("q"), torch.device("cpu")
    with pytest.raises(TypeError, match="takes 13 arguments"):
        match([], [])
    with pytest.raises(TypeError, match="param_dtype: torch.dtype"):
        match([], [], [], [], "float32", f32, q, [], f32, q, q, cpu, True)
    with pytest.raises(TypeError, match="state_dtype: torch.dtype"):
        match([], [], [], [], f32, f32, q, [], "float32", q, q, cpu, True)
    with pytest.raises(TypeError, match="names: list"):
        match([], [], ("exp_avg",), [], f32, f32, q, [], f32, q, q, cpu, True)
    for bad in ([], array("i"), array("d")):  # int64s only, in one buffer
        with pytest.raises(TypeError, match=r"addresses: array\('q'\)"):
            match([], [], [], [], f32, f32, bad, [], f32, q, q, cpu, True)
        with pytest.raises(TypeError, match=r"numels: array\('q'\)"):
            match([], [], [], [], f32, f32, q, [], f32, bad, q, cpu, True)
        with pytest.raises(TypeError, match=r"found: array\('q'\), writable"):
            match([], [], [], [], f32, f32, q, [], f32, q, bad, cpu, True)
    with pytest.raises(TypeError, match=r"found: array\('q'\), writable"):  # a read-only buffer
        match([], [], [], [], f32, f32, q, [], f32, q, memoryview(array("q")).toreadonly(), cpu, True)
    with pytest.raises(TypeError, match="device: torch.device"):
        match([], [], [], [], f32, f32, q, [], f32, q, q, "cpu", True)
    with pytest.raises(TypeError, match="dense_layouts: bool"):
        match([], [], [], [], f32, f32, q, [], f32, q, q, cpu, 1)
    assert match([], [], [], [], f32, f32, q, [], f32, q, q, cpu, True) == (0, [])  # an empty bucket matches
