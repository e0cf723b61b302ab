"""Every usable fused backend against the reference path, on params and every state tensor, over 20 steps.

Driven by tests/cases.py (optimizers x backends x dtypes x option variants). Tolerances: tests/tolerances.py.
Shapes are deliberately awkward: 0-d, one element, zero-size, odd sizes, a size crossing a 4096-element block
boundary, 2-D and 3-D. Gradients span six orders of magnitude across tensors so eps matters for some; steps 9
and 10 use a 20x learning rate.
"""
import pytest
import torch

from cases import DTYPES, OPTIMIZERS, case_id, parity_cases
from conftest import DEVICE
from tolerances import (assert_close_atol, assert_within_ulps, param_ulps, state_atol, theta_atol)

SHAPES = [(), (1,), (0,), (123,), (4097,), (33, 65), (2, 3, 5)]
GRAD_SCALES = [1.0, 1e-3, 10.0, 1.0, 1e2, 1e-1, 1.0]
STEPS = 20
BIG_LR_STEPS = (9, 10)


def make_params(dtype, device=DEVICE, shapes=SHAPES):
    return [torch.randn(s, device=device).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def run_parity(case, backend, dtype, variant, *, master=False, steps=STEPS, lr=None, shapes=SHAPES):
    """Step a fused-backend optimizer and a reference one side by side on identical grads; return both."""
    base_lr = case.lr if lr is None else lr
    fused_params = make_params(dtype, shapes=shapes)
    ref_params = clone_params(fused_params)
    lr_f = base_lr.clone() if isinstance(base_lr, torch.Tensor) else base_lr
    fused = case.cls(fused_params, lr=lr_f, backend=backend, master_weights=master, **variant)
    ref = case.cls(ref_params, lr=float(base_lr), backend="reference", master_weights=master, **variant)
    lrs = []
    for k in range(steps):
        step_lr = float(base_lr) * (20.0 if k in BIG_LR_STEPS else 1.0)
        lrs.append(step_lr)
        for opt in (fused, ref):
            group = opt.param_groups[0]
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(step_lr)
            else:
                group["lr"] = step_lr
        for pf, pr, scale in zip(fused_params, ref_params, GRAD_SCALES):
            g = (torch.randn(pf.shape, device=pf.device) * scale).to(pf.grad.dtype if pf.grad is not None else dtype)
            pf.grad = g.clone()
            pr.grad = g.clone()
        fused.step()
        ref.step()
    return fused, ref, fused_params, ref_params, lrs


def assert_parity(case, fused, ref, fused_params, ref_params, lrs, dtype, variant, master):
    steps = len(lrs)
    l2 = variant.get("weight_decay", 0.0) if not case.cls.__name__.endswith("W") else 0.0
    for i, (pf, pr) in enumerate(zip(fused_params, ref_params)):
        sf, sr = fused.state[pf], ref.state[pr]
        assert set(sf) == set(sr), f"param {i}: state keys {sorted(sf)} != reference {sorted(sr)}"
        assert sf["step"].dtype == torch.float32 and sf["step"].dim() == 0
        assert float(sf["step"]) == float(sr["step"]) == steps, f"param {i}: step {float(sf['step'])}"
        if pr.numel() == 0:
            continue
        max_theta = pr.detach().abs().max().item()
        atol = theta_atol(lrs, max_theta)
        if dtype == torch.float32:
            assert_close_atol(pf.detach(), pr.detach(), atol, f"param {i}")
            d_theta = atol
        else:
            assert_within_ulps(pf.detach(), pr.detach(), param_ulps(dtype, master), f"param {i} ({dtype})")
            d_theta = param_ulps(dtype, master) * 2.0 ** -7 * max_theta
        if master:
            assert_close_atol(sf["master_param"], sr["master_param"], atol, f"param {i} master_param")
            d_theta = atol
        for key in case.state_keys:
            if key not in sr:
                continue
            assert sf[key].dtype == torch.float32, f"param {i} {key} is {sf[key].dtype}, states are fp32"
            ref_state = sr[key]
            tol = state_atol(steps, ref_state.abs().max().item()) + steps * l2 * d_theta
            assert_close_atol(sf[key], ref_state, tol, f"param {i} {key}")


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
    fused, ref, pf, pr, lrs = run_parity(case, backend, dtype, variant)
    assert_parity(case, fused, ref, pf, pr, lrs, dtype, variant, master=False)


@pytest.mark.parametrize("opt,backend,dtype", [
    pytest.param(o, b, d, id=f"{o}-{b}-{case_id(d)}") for o, b, d in parity_cases() if d != torch.float32])
def test_parity_master_weights(opt, backend, dtype):
    case = OPTIMIZERS[opt]
    variant = case.variants[1]
    fused, ref, pf, pr, lrs = run_parity(case, backend, dtype, variant, master=True)
    for p in pf:
        assert fused.state[p]["master_param"].dtype == torch.float32
    assert_parity(case, fused, ref, pf, pr, lrs, dtype, variant, master=True)


@pytest.mark.parametrize("opt,backend", sorted({(o, b) for o, b, _ in parity_cases()}))
def test_parity_tensor_lr(opt, backend):
    """lr as a 1-element tensor on the params' device: the kernel reads it (no host sync)."""
    case = OPTIMIZERS[opt]
    lr = torch.tensor(case.lr, device=DEVICE)
    fused, ref, pf, pr, lrs = run_parity(case, backend, torch.float32, {}, lr=lr)
    assert isinstance(fused.param_groups[0]["lr"], torch.Tensor)
    assert_parity(case, fused, ref, pf, pr, lrs, torch.float32, {}, master=False)


def test_parity_table_covers_every_dtype():
    """The table is not silently empty: every optimizer x dtype has a fused backend on this machine."""
    cases = parity_cases()
    assert {(o, d) for o, _, d in cases} == {(o, d) for o in OPTIMIZERS for d in DTYPES}
