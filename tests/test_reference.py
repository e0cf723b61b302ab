"""The reference path is the spec; here it is checked against torch.optim.Adam / AdamW in float64.

Both run the same formula operation for operation in float64, so they agree to rounding: 1e-12 absolute on
params of magnitude ~1 after 25 steps (float64 eps is 2.2e-16; 25 steps x ~10 rounded ops x |theta| ~ 3 gives
~1e-14, and 1e-12 leaves room for torch's FMA use on CPU without hiding a formula difference, which would show
at ~lr = 1e-2).
"""
import pytest
import torch

import fused_optim

STEPS = 25
SHAPES = [(), (7,), (5, 3)]

CONFIGS = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(amsgrad=True),
    dict(amsgrad=True, weight_decay=0.05, maximize=True),
    dict(maximize=True, betas=(0.3, 0.6), eps=1e-3),
    dict(betas=(0.0, 0.0)),
]


def _run(opt_cls, params, kwargs, grads_per_step, lr_schedule=None):
    opt = opt_cls(params, lr=1e-2, **kwargs)
    for k, grads in enumerate(grads_per_step):
        if lr_schedule is not None:
            opt.param_groups[0]["lr"] = lr_schedule[k]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _grads(steps=STEPS):
    return [[torch.randn(s, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_reference_equals_torch_adam_float64(kwargs):
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads = _grads()
    lrs = [1e-2 * (1 + (k % 5)) for k in range(STEPS)]  # lr changes every step, like a schedule
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = _run(lambda p, **kw: fused_optim.FusedAdam(p, backend="reference", **kw), ours, kwargs, grads, lrs)
    ref = _run(lambda p, **kw: torch.optim.Adam(p, foreach=False, **kw), theirs, kwargs, grads, lrs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert (a - b).abs().max() < 1e-12
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in ref.state[b]:
                torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=0, atol=1e-12)
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"]) == STEPS
    # The comparison is not vacuous: the params moved by far more than the tolerance.
    assert max((a - p0).abs().max().item() for a, p0 in zip(ours, init)) > 1e-3


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_reference_equals_torch_adamw_float64(wd):
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads = _grads()
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = _run(lambda p, **kw: fused_optim.FusedAdamW(p, backend="reference", **kw), ours, dict(weight_decay=wd), grads)
    _run(lambda p, **kw: torch.optim.AdamW(p, foreach=False, **kw), theirs, dict(weight_decay=wd), grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert opt.defaults["decoupled_weight_decay"] is True


def test_reference_detects_a_wrong_formula(monkeypatch):
    """The comparison above can fail: an AdamW step (decay applied to the param) is not an L2 Adam step."""
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads = _grads(5)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    _run(lambda p, **kw: fused_optim.FusedAdam(p, backend="reference", decoupled_weight_decay=True, **kw), ours,
         dict(weight_decay=0.1), grads)
    _run(lambda p, **kw: torch.optim.Adam(p, foreach=False, **kw), theirs, dict(weight_decay=0.1), grads)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) > 1e-9
