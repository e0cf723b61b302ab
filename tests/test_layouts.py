"""Params in dense non-contiguous memory layouts: ``torch.channels_last`` conv weights (4-D and 5-D) and a
column-major matrix, as a model converted with ``model.to(memory_format=torch.channels_last)`` has.

The fused kernels of the elementwise rules (Adam, AdamW, LAMB) walk each tensor's memory flat and pair a param's
grad and state tensors with it element by element, so such a param is updated like a contiguous one as long as
its grad and state are laid out like it (autograd gives a dense param a grad of its strides, and state is made
with ``torch.preserve_format``). These tests check that against the reference (params and every state tensor,
20 steps, the bounds of tests/test_parity.py and tests/test_lamb.py), that the layouts are kept, that the step
plan takes such params, and that what the kernels cannot take (a grad or state laid out unlike its param, a
param with gaps, Adafactor's non-contiguous params) is refused before anything is written.
"""
import copy

import pytest
import torch

import fused_optim
from fused_optim import FusedAdafactor, FusedAdamW, FusedLAMB, native, testing

from cases import OPTIMIZERS, case_id, fused_backends
from conftest import DEVICE
from test_parity import GRAD_SCALES, STEPS, assert_parity

# A 4-D tensor that crosses a 4096-element block, a 5-D one, a matrix, a 4-D one whose channels_last strides
# differ from its contiguous ones in size-1 dims only (so it is both), a vector and a scalar: all in one launch.
SHAPES = [(2, 3, 5, 7), (4, 37, 7, 5), (3, 2, 4, 5, 6), (33, 65), (8, 3, 1, 1), (123,), ()]
PERMUTED = 4  # the first 4 shapes are not contiguous once permuted


def permuted(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a dense, non-contiguous layout where its shape has one: channels_last (4-D),
    channels_last_3d (5-D), column-major (2-D)."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t


def counting(cls):
    """``cls`` counting the steps that took the full path (``_collect``) rather than the step plan."""

    class Counted(cls):
        collects = 0

        def _collect(self):
            self.collects += 1
            return super()._collect()

    Counted.__name__ = cls.__name__
    return Counted


def assert_laid_out_alike(opt, params):
    """Every state tensor of the param's size has the param's strides: the layout was kept, step after step."""
    assert sum(not p.is_contiguous() for p in params) == PERMUTED, "the layouts under test were not made"
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if value.numel() == p.numel() and p.numel() > 1:
                assert value.shape == p.shape and value.stride() == p.stride(), (i, key, value.stride(), p.stride())


@pytest.fixture(params=["C", "python"])
def plan_check(request, monkeypatch):
    """The step plan's per-tensor check in C (the extension's plan_match) and in Python (_plan_match_py)."""
    if request.param == "python":
        monkeypatch.setattr(fused_optim.native, "plan_match", lambda: None)
    return request.param


@pytest.mark.parametrize("opt,variant", [("adam", 1), ("adam", 2), ("adamw", 0), ("adamw", 1)])
@pytest.mark.parametrize("backend", fused_backends())
def test_adam_in_permuted_layouts_matches_the_reference(opt, variant, backend, plan_check):
    """Adam (L2; amsgrad) and AdamW on permuted params: parity with the reference on params and state (the bounds
    of test_parity), the layouts kept, and every step after the first planned."""
    case = OPTIMIZERS[opt]
    run = testing.run_parity(counting(case.cls), backend, torch.float32, case.variants[variant], shapes=SHAPES,
                             grad_scales=GRAD_SCALES, device=DEVICE, steps=STEPS, lr=case.lr, layout=permuted)
    assert_parity(case, run, torch.float32, case.variants[variant], master=False)
    assert_laid_out_alike(run.fused, run.fused_params)
    assert run.fused.collects == 1, "steps on permuted params must keep the step plan"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=case_id)
@pytest.mark.parametrize("backend", fused_backends())
def test_master_weights_in_permuted_layouts(backend, dtype):
    """bf16/fp16 params with fp32 master weights: the master copy takes its param's layout, and the param is its
    master rounded to nearest, element by element."""
    case = OPTIMIZERS["adamw"]
    run = testing.run_parity(case.cls, backend, dtype, case.variants[1], shapes=SHAPES, grad_scales=GRAD_SCALES,
                             device=DEVICE, steps=STEPS, lr=case.lr, master=True, layout=permuted)
    assert_parity(case, run, dtype, case.variants[1], master=True)
    assert_laid_out_alike(run.fused, run.fused_params)
    for p in run.fused_params:
        assert torch.equal(p.detach(), run.fused.state[p]["master_param"].to(dtype))


@pytest.mark.parametrize("dtype,options", [(torch.float32, dict(max_grad_norm=1.0)), (torch.bfloat16, {})],
                         ids=["float32-clip", "bfloat16"])
@pytest.mark.parametrize("backend", fused_backends(rule="lamb"))
def test_lamb_in_permuted_layouts_matches_the_reference(backend, dtype, options):
    """LAMB on permuted params: the per-tensor norms are sums over the same elements in another order, within the
    bounds of test_lamb (testing.lamb_parity, end to end: never re-aligned)."""
    run, checks = testing.lamb_parity(counting(FusedLAMB), backend, dtype, dict(weight_decay=0.01), shapes=SHAPES,
                                      grad_scales=GRAD_SCALES, device=DEVICE, steps=STEPS, resync=False,
                                      layout=permuted, **options)
    assert checks, "nothing was compared"
    for what, error, bound in checks:
        assert error <= bound, f"{what}: error {error:.3e} > bound {bound:.3e}"
    assert_laid_out_alike(run.fused, run.fused_params)
    assert run.fused.collects == 1, "steps on permuted params must keep the step plan"


def _grads(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    return [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]


@pytest.mark.parametrize("cls", [FusedAdamW, FusedLAMB], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", fused_backends())
def test_a_checkpoint_of_a_contiguous_model_loads_into_a_permuted_one(cls, backend):
    """State saved for contiguous params loads into channels_last ones laid out as its params (the same values):
    the run goes on as the contiguous one does. Adam is elementwise: bitwise the same; LAMB sums its norms in
    another order: within the one-step bound of test_lamb, here met with room by an error 1e5 times smaller than
    any step (a wrong pairing of state and param elements moves params by a whole step)."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]
    flat = [v.clone().requires_grad_() for v in values]
    opt = cls(flat, lr=1e-2, backend=backend)
    for k in range(3):
        for p, g in zip(flat, _grads(flat, k)):
            p.grad = g
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as torch.save and torch.load give it (state_dict() aliases the state)
    perm = [permuted(p.detach().clone()).requires_grad_() for p in flat]
    opt2 = cls(perm, lr=1e-2, backend=backend)
    opt2.load_state_dict(saved)
    assert_laid_out_alike(opt2, perm)
    before = [p.detach().clone() for p in flat]
    for k in range(3, 6):
        for p, q, g in zip(flat, perm, _grads(flat, k)):
            p.grad, q.grad = g, permuted(g.clone())
        opt.step()
        opt2.step()
    for i, (p, q, b) in enumerate(zip(flat, perm, before)):
        if cls is FusedAdamW:
            assert torch.equal(p, q), i
            assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p]), i
        else:
            moved = (p - b).abs().max().item() if p.numel() else 0.0
            assert (p - q).abs().max().item() <= 1e-5 * moved, i
    assert_laid_out_alike(opt2, perm)


@pytest.mark.parametrize("backend", fused_backends())
def test_a_grad_laid_out_unlike_its_param_is_refused(backend):
    """A channels_last param given a contiguous grad (assigned by hand; autograd gives the param's strides): the
    kernels would pair the wrong elements. A clear error naming the param and the fix, nothing written."""
    good = torch.randn(5, device=DEVICE).requires_grad_()
    p = permuted(torch.randn(2, 3, 4, 5, device=DEVICE)).requires_grad_()
    opt = FusedAdamW([good, p], lr=0.1, backend=backend)
    good.grad, p.grad = torch.ones(5, device=DEVICE), torch.ones(2, 3, 4, 5, device=DEVICE)
    before = [good.detach().clone(), p.detach().clone()]
    with pytest.raises(RuntimeError, match=r"the grad of param 1 of param group 0 is laid out unlike its param "
                                           r"\(strides \(60, 20, 5, 1\), the param's \(60, 1, 15, 3\)\).*"
                                           r"torch.empty_like\(param\).copy_\(grad\)"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(good, before[0]) and torch.equal(p, before[1])
    p.grad = permuted(p.grad)
    opt.step()
    assert not torch.equal(p, before[1])


@pytest.mark.parametrize("backend", fused_backends())
def test_a_param_with_gaps_is_refused(backend):
    """A param that is a strided view with gaps (every other column of a matrix) does not cover its memory: the
    kernels, walking numel() elements flat, would update the wrong ones."""
    base = torch.randn(6, 8, device=DEVICE)
    p = torch.nn.Parameter(base[:, ::2])
    opt = FusedAdamW([p], backend=backend)
    p.grad = torch.ones(6, 8, device=DEVICE)[:, ::2]  # laid out like it
    before = base.clone()
    with pytest.raises(RuntimeError, match=r"param 0 of param group 0 is a strided view with gaps or overlaps "
                                           r"\(shape \(6, 4\), strides \(8, 2\)\).*\.clone\(\)"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(base, before)


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
@pytest.mark.parametrize("backend", fused_backends())
def test_a_param_converted_after_its_state_was_made(backend, planned, plan_check):
    """A model converted to channels_last after the optimizer made its (contiguous) state: the state is laid out
    unlike its param, a clear error before anything is written (on the step plan's path too: the new param
    address sends it to the full path, which checks). Saving and loading the state_dict lays the state out as its
    param, and the run goes on as the contiguous one would, bitwise (Adam is elementwise)."""
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES[:2]]
    a = [v.clone().requires_grad_() for v in values]
    b = [v.clone().requires_grad_() for v in values]
    opt_a, opt_b = (FusedAdamW(x, lr=1e-2, backend=backend) for x in (a, b))
    for k in range(2):
        for p, q, g in zip(a, b, _grads(a, k)):
            p.grad, q.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    if not planned:
        opt_b._planned_buckets = lambda: None
    for q in b:
        q.data = permuted(q.data)
    grads = _grads(a, 2)
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g, permuted(g.clone())
    before = [q.detach().clone() for q in b]
    state = {k: v.clone() for k, v in opt_b.state[b[1]].items()}
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' of param 0 of param group 0 is laid out unlike "
                                         r"its param.*save and load the optimizer's state_dict"):
        opt_b.step()
    assert all(torch.equal(q, x) for q, x in zip(b, before))
    assert all(torch.equal(opt_b.state[b[1]][k], v) for k, v in state.items())
    opt_b.load_state_dict(opt_b.state_dict())
    opt_a.step()
    opt_b.step()
    for p, q in zip(a, b):
        assert not q.is_contiguous() and torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_a.state[p])


@pytest.mark.parametrize("backend", fused_backends(rule="adafactor"))
def test_adafactor_refuses_a_non_contiguous_param(backend):
    """Adafactor's kernels read the rows and columns of each param's contiguous 2-D view: a channels_last param is
    refused with the fix (the reference takes it), nothing written."""
    p = permuted(torch.randn(2, 3, 4, 5, device=DEVICE)).requires_grad_()
    opt = FusedAdafactor([p], backend=backend)
    p.grad = permuted(torch.ones(p.shape, device=DEVICE))
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"param 0 of param group 0 is not contiguous \(shape \(2, 3, 4, 5\), "
                                           r"strides \(60, 1, 15, 3\)\); backend='\w+' reads the rows and columns of "
                                           r"contiguous params only.*contiguous_format"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(p, before)
    FusedAdafactor([p], backend="reference").step()
    assert not torch.equal(p, before)


@pytest.mark.skipif(native.unusable_reason(DEVICE) is not None, reason="native backend unavailable")
def test_native_ops_check_the_layouts_they_are_given():
    """The native operators check what they are handed, whoever calls them: a state tensor at the table's address
    but laid out unlike its param, and a param with gaps, are refused."""
    p = permuted(torch.randn(2, 3, 4, 5, device=DEVICE)).requires_grad_()
    opt = FusedAdamW([p], backend="native")
    p.grad = permuted(torch.randn(p.shape, device=DEVICE))
    opt.step()
    launcher = native.RULES["adam"]
    bucket = opt._collect()[0]
    bucket.states = [opt.state[p]]
    operands = bucket.operands(launcher.OPERANDS)
    table = opt._tables[bucket.key]
    hp = opt._group_hyperparameters(opt.param_groups[0], DEVICE)
    launcher(table, operands, hp)  # as it is: accepted
    m = operands["exp_avg"][0]
    flat = m.as_strided(m.shape, torch.empty(m.shape).stride())  # the same memory, read as contiguous
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] is laid out unlike params\[0\] \(strides \[60, 20, 5, 1\], "
                                           r"the param's \[60, 1, 15, 3\]\)"):
        launcher(table, dict(operands, exp_avg=[flat]), hp)
    gappy = torch.randn(2, 3, 4, 10, device=DEVICE)[..., ::2]
    with pytest.raises(RuntimeError, match=r"params\[0\] has gaps or overlaps in memory"):
        launcher(table, dict(operands, param=[gappy]), hp)
