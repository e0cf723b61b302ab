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


ADAMW_CONFIGS = [
    dict(),  # the defaults (weight_decay=0.01): FusedAdamW's must be torch's
    dict(weight_decay=0.0),
    dict(weight_decay=0.3),
    dict(amsgrad=True, weight_decay=0.05, maximize=True),
    dict(maximize=True, betas=(0.3, 0.6), eps=1e-3, weight_decay=0.1),
]


def _ids(kwargs):
    return ",".join(f"{a}={b}" for a, b in kwargs.items()) or "default"


def _compare(fused_cls, torch_cls, kwargs, steps=STEPS):
    """Both classes from the same params and grads, the lr changing every step like a schedule; returns
    (ours, theirs, our optimizer, torch's optimizer, initial params)."""
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads = _grads(steps)
    lrs = [1e-2 * (1 + (k % 5)) for k in range(steps)]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = _run(lambda p, **kw: fused_cls(p, backend="reference", **kw), ours, kwargs, grads, lrs)
    ref = _run(lambda p, **kw: torch_cls(p, foreach=False, **kw), theirs, kwargs, grads, lrs)
    return ours, theirs, opt, ref, init


def _assert_same(ours, theirs, opt, ref, steps=STEPS):
    """Params and every state tensor within 1e-12 (module docstring), and the same step count."""
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (key in opt.state[a]) == (key in ref.state[b]), key
            if key in ref.state[b]:
                torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=0, atol=1e-12)
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"]) == steps


@pytest.mark.parametrize("kwargs", CONFIGS, ids=_ids)
def test_reference_equals_torch_adam_float64(kwargs):
    ours, theirs, opt, ref, init = _compare(fused_optim.FusedAdam, torch.optim.Adam, kwargs)
    _assert_same(ours, theirs, opt, ref)
    # The comparison is not vacuous: the params moved by far more than the tolerance.
    assert max((a - p0).abs().max().item() for a, p0 in zip(ours, init)) > 1e-3


@pytest.mark.parametrize("kwargs", ADAMW_CONFIGS, ids=_ids)
def test_reference_equals_torch_adamw_float64(kwargs):
    """FusedAdamW against torch.optim.AdamW with the same keywords: the parity tests build both sides from one
    class, so this is where FusedAdamW's own keywords and defaults (amsgrad, maximize, betas, eps) are checked."""
    ours, theirs, opt, ref, init = _compare(fused_optim.FusedAdamW, torch.optim.AdamW, kwargs)
    _assert_same(ours, theirs, opt, ref)
    assert max((a - p0).abs().max().item() for a, p0 in zip(ours, init)) > 1e-3
    assert opt.defaults["decoupled_weight_decay"] is True


def test_reference_detects_a_wrong_formula():
    """The comparison above can fail: an AdamW step (decay applied to the param) is not an L2 Adam step."""
    ours, theirs, opt, ref, _ = _compare(
        lambda p, **kw: fused_optim.FusedAdam(p, decoupled_weight_decay=True, **kw), torch.optim.Adam,
        dict(weight_decay=0.1), steps=5)
    with pytest.raises(AssertionError):
        _assert_same(ours, theirs, opt, ref, steps=5)
