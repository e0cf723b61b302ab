"""Every usable fused backend against the reference path, on params and every state tensor, over 20 steps.

Driven by tests/cases.py (optimizers x backends x dtypes x option variants). The side-by-side run and the
derived bounds live in fused_optim/testing.py (shared with ``python -m fused_optim check``). Shapes are
deliberately awkward: 0-d, one element, zero-size, odd sizes, a size crossing a 4096-element block boundary,
2-D and 3-D. Gradients span six orders of magnitude across tensors so eps matters for some; steps 9 and 10 use a
20x learning rate.
"""
import pytest
import torch

from fused_optim import testing
from cases import DTYPES, OPTIMIZERS, case_id, parity_cases
from conftest import DEVICE

SHAPES = [(), (1,), (0,), (123,), (4097,), (33, 65), (2, 3, 5)]
GRAD_SCALES = [1.0, 1e-3, 10.0, 1.0, 1e2, 1e-1, 1.0]
STEPS = 20
BIG_LR_STEPS = testing.BIG_LR_STEPS


def make_params(dtype, device=DEVICE, shapes=SHAPES):
    """Random leaf params of ``shapes`` in ``dtype`` (for tests that drive their own loop)."""
    return [torch.randn(s, device=device).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def run_parity(case, backend, dtype, variant, *, master=False, steps=STEPS, lr=None, shapes=SHAPES):
    """Step a fused-backend optimizer and a reference one side by side on identical grads; return both."""
    return testing.run_parity(case.cls, backend, dtype, variant, shapes=shapes, grad_scales=GRAD_SCALES,
                              device=DEVICE, steps=steps, lr=case.lr if lr is None else lr, master=master)


def assert_parity(case, run, dtype, variant, master):
    l2 = 0.0 if variant.get("decoupled_weight_decay") or case.cls.__name__.endswith("W") \
        else variant.get("weight_decay", 0.0)
    checks = testing.adam_parity_checks(run, dtype, case.state_keys, l2, master)
    assert checks, "nothing was compared"
    for what, error, bound in checks:
        assert error <= bound, f"{what}: error {error:.3g} > bound {bound:.3g}"


def _variant_cases():
    out = []
    for opt, backend, dtype in parity_cases():
        for vi in range(len(OPTIMIZERS[opt].variants)):
            out.append(pytest.param(opt, backend, dtype, vi, id=f"{opt}-{backend}-{case_id(dtype)}-v{vi}"))
    return out


@pytest.mark.parametrize("opt,backend,dtype,variant_index", _variant_cases())
def test_parity(opt, backend, dtype, variant_index):
    case = OPTIMIZERS[opt]
    variant = case.variants[variant_index]
    run = run_parity(case, backend, dtype, variant)
    assert_parity(case, run, dtype, variant, master=False)


@pytest.mark.parametrize("opt,backend,dtype", [
    pytest.param(o, b, d, id=f"{o}-{b}-{case_id(d)}") for o, b, d in parity_cases() if d != torch.float32])
def test_parity_master_weights(opt, backend, dtype):
    """bf16/fp16 params with fp32 master weights. The parity bound on the param allows its own rounding (one ulp
    of its dtype), so the rounding itself is checked exactly, on both sides: the param is its master rounded to
    nearest even, as ``master.to(dtype)`` rounds (a truncating rounding is within the ulp and fails only here)."""
    case = OPTIMIZERS[opt]
    variant = case.variants[1]
    run = run_parity(case, backend, dtype, variant, master=True)
    for side, params in ((run.fused, run.fused_params), (run.ref, run.ref_params)):
        for i, p in enumerate(params):
            master = side.state[p]["master_param"]
            assert master.dtype == torch.float32
            assert torch.equal(p.detach(), master.to(dtype)), f"param {i} is not its master rounded to nearest"
    assert_parity(case, run, dtype, variant, master=True)


@pytest.mark.parametrize("opt,backend", sorted({(o, b) for o, b, _ in parity_cases()}))
def test_parity_tensor_lr(opt, backend):
    """lr as a 1-element tensor on the params' device: the kernel reads it (no host sync)."""
    case = OPTIMIZERS[opt]
    lr = torch.tensor(case.lr, device=DEVICE)
    run = run_parity(case, backend, torch.float32, {}, lr=lr)
    assert isinstance(run.fused.param_groups[0]["lr"], torch.Tensor)
    assert_parity(case, run, torch.float32, {}, master=False)


def test_parity_detects_a_small_step_size_error():
    """The bounds catch a systematic error: a run with a 1e-4 relative error in lr fails them (~10x over)."""
    case = OPTIMIZERS["adamw"]
    backend = "reference"
    good = run_parity(case, backend, torch.float32, {})
    biased = run_parity(case, backend, torch.float32, {}, lr=case.lr * (1 + 1e-4))
    mixed = good._replace(ref=biased.ref, ref_params=biased.ref_params, ref_max_abs=biased.ref_max_abs)
    with pytest.raises(AssertionError, match="bound"):
        assert_parity(case, mixed, torch.float32, {}, master=False)


def test_parity_table_covers_every_dtype():
    """The table is not silently empty: every optimizer x dtype has a fused backend on this machine."""
    cases = parity_cases()
    assert {(o, d) for o, _, d in cases} == {(o, d) for o in OPTIMIZERS for d in DTYPES}
