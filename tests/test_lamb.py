"""FusedLAMB: the reference against an independent float64 implementation of issue 4's formula, and every usable
fused backend against the reference (params and state, 20 steps, fp32/bf16/fp16, master weights), plus the
edges: zero tensors, trust_clip, layer_adaptation=False, max_grad_norm on and off, 1,000 tensors, determinism,
GradScaler. Tolerances: fused_optim/testing.py, "LAMB" (re-exported by tests/tolerances.py).

Why not the shared test_parity: its bound is Adam's (|update| <= 10 lr); LAMB's update is lr * r * u with r a
ratio of norms whose summation order differs between kernel and reference. The side-by-side run and its bounds
are ``fused_optim.testing.lamb_parity`` (shared with ``python -m fused_optim check``): by default each parity
step starts both optimizers from the same state (the fused one copied into the reference) and checks the
one-step bound; ``test_parity_end_to_end`` never re-aligns them and checks the accumulated gap against the
propagated bound. Shapes, grad scales and the 20x learning-rate steps are test_parity's.

Run: ``python -m pytest tests/test_lamb.py -q``: about 110 s of CPU under TRITON_INTERPRET=1, 27 s of it the
1,000-tensor step (the interpreter runs one Python call per block: 1,000 blocks in each pass, 2,000 in the
segment sum).
"""
import math

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim import FusedLAMB, backends, kernels, native, testing
from fused_optim.kernels import engine

from cases import case_id, fused_backends
from conftest import DEVICE
from test_parity import GRAD_SCALES, SHAPES, STEPS
from tolerances import (BIG_LR_STEPS, EPS32, global_clip_f64, lamb_clip_gap, lamb_moment_bounds, lamb_step_f64,
                        lamb_theta_bound, n_blocks, norm_f64, sum_sq_rel)

BACKENDS = fused_backends(rule="lamb")
LR = 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Harness for the tests that drive their own loop.
# ----------------------------------------------------------------------------------------------------------------
def make_params(dtype, shapes=SHAPES):
    return [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]


def build(backend, dtype, group_specs, *, master=False, max_grad_norm=None, shapes=SHAPES):
    """A fused FusedLAMB on random params; param i goes to group ``i % len(group_specs)``."""
    params = make_params(dtype, shapes=shapes)
    groups = [dict(params=params[j::len(group_specs)], **spec) for j, spec in enumerate(group_specs)]
    return FusedLAMB(groups, lr=LR, backend=backend, master_weights=master, max_grad_norm=max_grad_norm), params


def randn_grads(params, k):
    return [(torch.randn(p.shape, device=p.device) * GRAD_SCALES[i % len(GRAD_SCALES)]).to(p.dtype)
            for i, p in enumerate(params)]


def launches(backend) -> int:
    """Kernel launches of a fused backend so far (the reference launches nothing)."""
    return (native.LAUNCHES if backend == "native" else engine.LAUNCHES)["count"]


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def parity(backend, dtype, groups, *, shapes=SHAPES, grad_scales=GRAD_SCALES, steps=STEPS, **options):
    """``testing.lamb_parity`` on this machine's test device; asserts every (what, error, bound) row."""
    run, checks = testing.lamb_parity(FusedLAMB, backend, dtype, groups, shapes=shapes, grad_scales=grad_scales,
                                      device=DEVICE, steps=steps, lr=LR, **options)
    assert checks, "nothing was compared"
    for what, error, bound in checks:
        assert error <= bound, f"{what}: error {error:.3e} > bound {bound:.3e}"
    return run, checks


# ----------------------------------------------------------------------------------------------------------------
# The reference is the formula.
# ----------------------------------------------------------------------------------------------------------------
# Issue 4's signature, written here and not read back from the optimizer: an oracle fed the optimizer's own
# param_groups would follow a constructor that stored other values (swapped betas, another eps) and pass.
SPEC_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True, trust_clip=None,
                     layer_adaptation=True)
REF_GROUPS = (
    dict(weight_decay=0.01),  # the defaults: bias correction, layer adaptation
    # biases and norms, as apex's default; r = 1 whatever the clip: the clip applies to adapted layers only
    dict(weight_decay=0.0, layer_adaptation=False, trust_clip=(2.0, math.inf)),
    # TF LAMB (no bias correction), clipped: the natural ratios of this group's tensors run from 1.2 to 260 over
    # the 20 steps, so both ends of (1.5, 3) clamp (counted by the test)
    dict(weight_decay=0.1, bias_correction=False, trust_clip=(1.5, 3.0), betas=(0.8, 0.95), eps=1e-8),
)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["no-clip", "clip"])
def test_reference_matches_float64_formula(max_grad_norm):
    """The reference in float64 (fp64 params) against lamb_step_f64 over 20 steps, three param groups (one of
    them bias_correction=False, i.e. the TF LAMBOptimizer, with a trust clip whose both ends clamp; one
    layer_adaptation=False with a clip that must not apply), a zero-initialized tensor, and the global clip. The
    oracle's hyperparameters are the spec's (SPEC_DEFAULTS, REF_GROUPS), not the optimizer's param_groups."""
    params = make_params(torch.float64, shapes=[(3, 4), (5,), (7,), (2, 2), (6,), ()])
    with torch.no_grad():
        params[3].zero_()  # ||theta|| = 0 -> r = 1 (group 0)
    opt = FusedLAMB([dict(params=params[j::3], **spec) for j, spec in enumerate(REF_GROUPS)], lr=LR,
                    backend="reference", max_grad_norm=max_grad_norm)
    hps = [dict(SPEC_DEFAULTS, **REF_GROUPS[i % len(REF_GROUPS)]) for i in range(len(params))]
    thetas = [p.detach().cpu().numpy().copy() for p in params]
    ms = [np.zeros_like(t) for t in thetas]
    vs = [np.zeros_like(t) for t in thetas]
    clipped = 0
    clamped = dict(lo=0, hi=0)  # adapted (tensor, step)s whose natural ratio the trust clip moved, at each end
    for k in range(STEPS):
        lr = LR * (20.0 if k in BIG_LR_STEPS else 1.0)
        set_lr(opt, lr)
        grads = randn_grads(params, k)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        g64 = [g.cpu().numpy() for g in grads]
        c = global_clip_f64(g64, max_grad_norm)
        clipped += c < 1.0
        for i, hp in enumerate(hps):
            hp["lr"] = lr
            e = lamb_step_f64(thetas[i], g64[i] * c, ms[i], vs[i], k, hp)
            if e["adapted"] and hp["trust_clip"] is not None:
                natural = norm_f64(thetas[i]) / norm_f64(e["u"])
                clamped["lo"] += natural < hp["trust_clip"][0]
                clamped["hi"] += natural > hp["trust_clip"][1]
            thetas[i], ms[i], vs[i] = e["theta"], e["m"], e["v"]
    # float64 roundings (2^-53 ~ 1e-16 relative, ~20 per step) amplified over 20 steps by the step map's
    # Lipschitz constant (<= prod(1 + 2 lr_t) < 4 here): far below 1e-12 relative, which a wrong formula exceeds.
    for i, p in enumerate(params):
        st = opt.state[p]
        scale = max(1.0, float(np.abs(thetas[i]).max()))
        np.testing.assert_allclose(p.detach().cpu().numpy(), thetas[i], rtol=0, atol=1e-12 * scale,
                                   err_msg=f"param {i}")
        np.testing.assert_allclose(st["exp_avg"].cpu().numpy(), ms[i], rtol=1e-12, atol=1e-300, err_msg=f"exp_avg {i}")
        np.testing.assert_allclose(st["exp_avg_sq"].cpu().numpy(), vs[i], rtol=1e-12, atol=1e-300,
                                   err_msg=f"exp_avg_sq {i}")
        assert float(st["step"]) == STEPS
    assert (clipped == STEPS) if max_grad_norm else (clipped == 0)
    assert np.abs(thetas[3]).max() > 0  # the zero tensor moved (r = 1 at step 1)
    assert clamped["lo"] > 0 and clamped["hi"] > 0, clamped  # both ends of the trust clip were exercised


# ----------------------------------------------------------------------------------------------------------------
# Fused backends against the reference.
# ----------------------------------------------------------------------------------------------------------------
PARITY = [
    # (dtype, param groups, options); param i goes to group i % len(groups) (SHAPES: (), (1,), (0,), (123,),
    # (4097,), (33, 65), (2, 3, 5)). fp32: (123,) starts at 0 in the plain adapted group (r = 1 at step 1) and
    # (33, 65) in a clipped one (r = 1 clamped to 1.5); the layer_adaptation=False group's clip must not apply.
    (torch.float32, (dict(weight_decay=0.01),
                     dict(weight_decay=0.0, layer_adaptation=False, trust_clip=(2.0, math.inf)),
                     dict(weight_decay=0.01, trust_clip=(1.5, 3.0))),
     dict(lr_tensor=True, zero=(3, 5))),
    (torch.bfloat16, (dict(weight_decay=0.1, bias_correction=False, trust_clip=(0.5, 1.0)),), {}),
    (torch.float16, (dict(weight_decay=0.01),), dict(max_grad_norm=1.0, exact_grads=True)),
    (torch.float16, (dict(weight_decay=0.01),), {}),  # fp16 grads of every scale (GRAD_SCALES: 1e-3 to 1e2)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,groups,options", PARITY, ids=["float32", "bfloat16", "float16-clip", "float16"])
def test_parity(backend, dtype, groups, options):
    parity(backend, dtype, groups, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=case_id)
def test_parity_master_weights(backend, dtype):
    """bf16 and fp16 params with fp32 master weights. The parity bound on the param allows its own rounding (one
    ulp of the param dtype), so the rounding itself is checked exactly: the param is its master rounded to
    nearest even, as ``master.to(dtype)`` rounds (a truncating or double rounding fails here)."""
    groups = (dict(weight_decay=0.01), dict(weight_decay=0.1, trust_clip=(0.0, 2.0)))
    run, _ = parity(backend, dtype, groups, master=True, max_grad_norm=4.0, exact_grads=True)
    for i, p in enumerate(run.fused_params):
        master = run.fused.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(p.detach(), master.to(dtype)), f"param {i} is not its master rounded to nearest"


END_TO_END = [
    # (dtype, master, param groups, options): clipping with random grads in the second makes the clip gap (and so
    # the moment channel of the propagation) non-zero.
    (torch.float32, False, (dict(weight_decay=0.01), dict(weight_decay=0.0, layer_adaptation=False)),
     dict(zero=(4,))),  # (4097,) starts at 0 in the adapted group: r = 1 at step 1
    (torch.bfloat16, True, (dict(weight_decay=0.01), dict(weight_decay=0.1, trust_clip=(0.0, 2.0))),
     dict(max_grad_norm=4.0)),
    # bf16 params rounded every step (no master): Adam's check in ulps at max_t |theta_t| replaces the accumulated
    # param bound (fused_optim/testing.py, LAMB); a rounding that is not to nearest drifts past it
    (torch.bfloat16, False, (dict(weight_decay=0.01), dict(weight_decay=0.1, trust_clip=(0.0, 2.0))),
     dict(max_grad_norm=4.0)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,master,groups,options", END_TO_END, ids=["float32", "bfloat16-master", "bfloat16"])
def test_parity_end_to_end(backend, dtype, master, groups, options):
    """Fused and reference run 20 steps (the 20x-lr steps included) without ever being re-aligned: every step's
    params, master weights and moments within the bound propagated from the gaps that entered it, and within the
    accumulated bound carried from the start (fused_optim/testing.py, LAMB, "End to end")."""
    run, checks = parity(backend, dtype, groups, master=master, resync=False, **options)
    accumulated = [c for c in checks if "(accumulated)" in c[0]]
    fp32_theta = dtype == torch.float32 or master
    kinds = ("exp_avg", "exp_avg_sq") + (("param",) if fp32_theta else ()) + (("master_param",) if master else ())
    tensors = sum(1 for s in SHAPES if torch.Size(s).numel())
    assert len(accumulated) == STEPS * tensors * len(kinds)
    in_ulps = [c for c in checks if "(ulps of" in c[0] and "max_t" in c[0]]
    assert len(in_ulps) == (0 if fp32_theta else STEPS * tensors)
    # The fp32 trajectories did drift apart (or this would test nothing that the resync parity does not). bf16
    # params without master weights end bitwise equal here (the per-step rounding to bf16 absorbs the fp32
    # gaps); that case is for the check in ulps, which a truncating rounding of the kernel fails at its second
    # step (the resync parity allows an ulp per step and does not).
    if fp32_theta:
        theta = [run.fused.state[p]["master_param"] if master else p for p in run.fused_params]
        theta_ref = [run.ref.state[p]["master_param"] if master else p for p in run.ref_params]
        assert any(not torch.equal(a, b) for a, b in zip(theta, theta_ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_end_to_end_fails_on_a_wrong_kernel(backend, monkeypatch):
    """The end-to-end bounds can fail: a fused kernel with a 1e-3 relative error in its learning rate exceeds both
    the per-step and the accumulated bound, from the first step to the last."""
    rules = native.RULES if backend == "native" else kernels.RULES
    real = rules["lamb"]

    def off_by_a_bit(table, *args, **kw):  # (table, hp) for triton, (table, operands, hp) for native
        *args, hp = args
        return real(table, *args, dict(hp, lr=float(hp["lr"]) * (1 + 1e-3)), **kw)
    off_by_a_bit.OPERANDS = real.OPERANDS
    monkeypatch.setitem(rules, "lamb", off_by_a_bit)
    dtype, master, groups, options = END_TO_END[0]
    _, checks = testing.lamb_parity(FusedLAMB, backend, dtype, groups, shapes=SHAPES, grad_scales=GRAD_SCALES,
                                    device=DEVICE, steps=STEPS, lr=LR, master=master, resync=False, **options)
    over = [what for what, error, bound in checks if error > bound]
    assert any(w.startswith("step 0 ") for w in over) and any(w.startswith(f"step {STEPS - 1} ") for w in over)
    assert any("(accumulated)" in w and w.startswith(f"step {STEPS - 1} ") for w in over)


@pytest.mark.parametrize("backend", BACKENDS)
def test_1000_tensors(backend):
    """One launch per pass for 1,000 tensors (3 launches a step with layer adaptation), per-tensor norms and steps,
    over 2 steps, the second with the state of the first (the 20-step parity runs on the shape set)."""
    shapes = [(i % 3,) if i % 7 else () for i in range(1000)]
    before = launches(backend)  # the reference launches nothing: these are the fused step's
    parity(backend, torch.float32, dict(), shapes=shapes, steps=2,
           grad_scales=[GRAD_SCALES[i % len(GRAD_SCALES)] for i in range(len(shapes))])
    assert launches(backend) - before == 2 * 3  # NORMS, segment_sum, APPLY a step: not one per tensor


# ----------------------------------------------------------------------------------------------------------------
# Semantics at the edges, on every backend (the reference included).
# ----------------------------------------------------------------------------------------------------------------
ALL = ("reference",) + BACKENDS


def one_step(backend, params, grads, **kwargs):
    opt = FusedLAMB(params, lr=LR, backend=backend, **kwargs)
    for p, g in zip(params, grads):
        p.grad = g
    before = [p.detach().clone() for p in params]
    opt.step()
    return opt, before


@pytest.mark.parametrize("backend", ALL)
def test_zero_tensor_has_unit_ratio(backend):
    """||theta|| = 0 -> r = 1: theta_1 = -lr * g / (|g| + eps) (first step, bias-corrected, no decay effect);
    a zero tensor with a zero grad has u = 0 too and stays 0 (no 0/0)."""
    params = [torch.zeros(5, device=DEVICE, requires_grad=True), torch.zeros(3, device=DEVICE, requires_grad=True)]
    g = torch.tensor([1.0, -2.0, 1e-7, 0.5, -3e-3], device=DEVICE)
    one_step(backend, params, [g, torch.zeros(3, device=DEVICE)], weight_decay=0.01)
    g64 = g.double()
    expected = -LR * g64 / (g64.abs() + 1e-6)
    # m^ = g and v^ = g^2 up to bias-correction roundings: a few eps32 relative.
    torch.testing.assert_close(params[0].detach().double(), expected, rtol=16 * EPS32, atol=0)
    assert torch.equal(params[1].detach(), torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("clip", [(0.0, 0.5), (30.0, math.inf)], ids=["hi", "lo"])
def test_trust_clip_clamps_the_ratio(backend, clip):
    """r = ||theta|| / ||u|| ~ 1 here; a clamp to [0, 0.5] or [30, inf] sets it: ||step|| = lr * r * ||u||."""
    n = 300
    p = torch.randn(n, device=DEVICE, requires_grad=True)
    g = torch.randn(n, device=DEVICE)
    _, before = one_step(backend, [p], [g], weight_decay=0.01, trust_clip=clip)
    theta = before[0].double().cpu().numpy()
    e = lamb_step_f64(theta, g.double().cpu().numpy(), 0.0, 0.0, 0,
                      dict(SPEC_DEFAULTS, lr=LR, weight_decay=0.01, trust_clip=clip))
    natural = norm_f64(theta) / norm_f64(e["u"])
    r = clip[1] if clip[0] == 0.0 else clip[0]
    assert not clip[0] <= natural <= clip[1]
    ratio = norm_f64(theta - p.detach().double().cpu().numpy()) / (LR * norm_f64(e["u"]))
    # Rounding theta' costs <= eps32 |theta'_i| per element, sqrt(n) eps32 max|theta'| in norm, against a step of
    # norm lr r ||u||; the fp32 u differs from e["u"] by <= K_U eps32 (|a| + lambda |theta|) ~ 14 eps32 |u| here.
    bound = math.sqrt(n) * EPS32 * float(p.detach().abs().max()) / (LR * r * norm_f64(e["u"])) + 16 * EPS32
    assert abs(ratio / r - 1) <= bound


@pytest.mark.parametrize("backend", ALL)
def test_layer_adaptation_false_has_unit_ratio(backend):
    """A group with layer_adaptation=False takes theta -= lr * u, though its natural ratio is far from 1."""
    p = (10 * torch.randn(200, device=DEVICE)).requires_grad_()
    q = (10 * torch.randn(200, device=DEVICE)).requires_grad_()
    g = torch.randn(200, device=DEVICE)
    opt = FusedLAMB([dict(params=[p], layer_adaptation=False), dict(params=[q])], lr=LR, backend=backend,
                    weight_decay=0.01)
    p.grad, q.grad = g.clone(), g.clone()
    before = p.detach().clone()
    count = launches(backend)
    opt.step()
    if backend != "reference":
        assert launches(backend) - count == 1 + 3  # the FUSED pass; NORMS, segment_sum, APPLY
    e = lamb_step_f64(before.double().cpu().numpy(), g.double().cpu().numpy(), 0.0, 0.0, 0,
                      dict(SPEC_DEFAULTS, lr=LR, weight_decay=0.01, layer_adaptation=False))
    assert abs(e["r"] - 1.0) == 0 and abs(norm_f64(before.double().cpu().numpy()) / norm_f64(e["u"]) - 1) > 1
    torch.testing.assert_close(p.detach().double().cpu(), torch.from_numpy(e["theta"]), rtol=0,
                               atol=4 * EPS32 * 40)  # a few roundings of |theta| <= 40
    assert not torch.allclose(p.detach(), q.detach())  # the adapted group moved differently


# ----------------------------------------------------------------------------------------------------------------
# Extreme magnitudes and NaN, on every fused backend against the reference: where an fp32 square overflows or
# vanishes (the kernels square and sum in float64, as the reference), and a NaN trust ratio through the trust clip.
# ----------------------------------------------------------------------------------------------------------------
def _same_pattern_within(what, got, want, bound):
    """``got`` has NaN exactly where ``want`` has, the same infs (signs included), and every other element within
    ``bound`` (elementwise, broadcast) of ``want``."""
    got, want = got.detach().double().cpu().numpy(), want.detach().double().cpu().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want)), \
        f"{what}: NaN at {np.flatnonzero(np.isnan(got))}, the reference at {np.flatnonzero(np.isnan(want))}"
    inf = np.isinf(want)
    assert np.array_equal(np.isinf(got), inf) and np.array_equal(got[inf], want[inf]), f"{what}: infs differ"
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), want.shape)
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(np.isfinite(want) & ~(np.abs(got - want) <= bound))
    assert bad.size == 0, (f"{what}: {bad.size} elements off, e.g. element {bad[0]}: {got.flat[bad[0]]!r} against "
                           f"the reference's {want.flat[bad[0]]!r} (bound {bound.flat[bad[0]]:.3e})")


def same_as_reference(backend, values, grads, *, max_grad_norm=None, **group):
    """One step of ``backend`` and one of the reference from the same fp32 params ``values`` and grads ``grads`` (one
    param group with options ``group``); every param and state tensor is then compared: steps exactly, NaN and inf
    patterns exactly, finite elements within the one-step bounds of fused_optim/testing.py, LAMB
    (``lamb_moment_bounds`` with the clip gap ``lamb_clip_gap``, and ``lamb_theta_bound``, from ``lamb_step_f64``
    of the step, as ``lamb_parity`` checks them). Returns the reference's params and optimizer."""
    runs = []
    for b in (backend, "reference"):
        params = [v.clone().to(DEVICE).requires_grad_() for v in values]
        opt = FusedLAMB(params, lr=LR, backend=b, max_grad_norm=max_grad_norm, **group)
        for p, g in zip(params, grads):
            p.grad = g.clone().to(DEVICE)
        opt.step()
        runs.append((params, opt))
    (fused_params, fused), (ref_params, ref) = runs
    hp = ref.param_groups[0]
    g64 = [g.double().numpy() for g in grads]
    c = global_clip_f64(g64, max_grad_norm)
    delta_c = 0.0 if max_grad_norm is None else lamb_clip_gap(sum(n_blocks(v.numel()) for v in values))
    for i, (pf, pr) in enumerate(zip(fused_params, ref_params)):
        sf, sr = fused.state[pf], ref.state[pr]
        assert float(sf["step"]) == float(sr["step"]) == 1.0, f"param {i}: step"
        theta, g = values[i].double().numpy(), g64[i] * c
        gap_m = (sf["exp_avg"].double() - sr["exp_avg"].double()).abs().cpu().numpy()
        gap_v = (sf["exp_avg_sq"].double() - sr["exp_avg_sq"].double()).abs().cpu().numpy()
        with np.errstate(all="ignore"):  # an inf param has a NaN bound: only finite elements use theirs
            e = lamb_step_f64(theta, g, np.zeros_like(theta), np.zeros_like(theta), 0, hp)
            b_m, b_v = lamb_moment_bounds(hp, g, float(sr["exp_avg"].abs().max()),
                                          float(sr["exp_avg_sq"].abs().max()), delta_c=delta_c)
            b_theta = lamb_theta_bound(e, hp, theta, n_blocks=n_blocks(theta.size), d_m=gap_m, d_v=gap_v)
        _same_pattern_within(f"param {i} exp_avg", sf["exp_avg"], sr["exp_avg"], b_m)
        _same_pattern_within(f"param {i} exp_avg_sq", sf["exp_avg_sq"], sr["exp_avg_sq"], b_v)
        _same_pattern_within(f"param {i}", pf, pr, b_theta)
    return ref_params, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_clip_of_a_grad_whose_fp32_square_overflows(backend):
    """One finite grad of 1e20 (g² = 1e40 overflows fp32): the reference's G ~ 1e20 clips every grad of the
    optimizer by c ~ 1e-20, so that the moments hold (1 - β1) g c: 0.1 at the big grad, 1e-22 at the grads of 0.1
    of the other param. An fp32 Σg² = inf made c = 0 and dropped every grad of the step (the moments stayed 0)."""
    values = [torch.randn(100), torch.randn(50)]
    grads = [torch.full((100,), 0.1), torch.full((50,), 0.1)]
    grads[0][7] = 1e20
    ref_params, ref = same_as_reference(backend, values, grads, max_grad_norm=1.0)
    m = [ref.state[p]["exp_avg"] for p in ref_params]
    assert float(m[0][7]) == pytest.approx(0.1, rel=1e-6) and float(m[1][0]) == pytest.approx(1e-22, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_ratio_of_params_whose_fp32_squares_vanish(backend):
    """Params of ~1e-24, whose squares (~1e-48) are below fp32's smallest subnormal; no weight decay: the reference's
    r = ‖θ‖ / ‖u‖ ~ 1e-24 makes the step lr ‖θ‖ in norm. An fp32 ‖θ‖² = 0 took r = 1: a step 1e22 times the
    params."""
    values = [torch.randn(300) * 1e-24, torch.randn(7, 9) * 1e-24]
    grads = [torch.randn(300), torch.randn(7, 9)]
    ref_params, _ = same_as_reference(backend, values, grads, weight_decay=0.0)
    for v, p in zip(values, ref_params):
        # ‖θ' - θ‖ = lr r ‖u‖ = lr ‖θ‖, up to the rounding of θ' (eps32 |θ'_i| per element: ~1e-5 relative here)
        assert norm_f64(p.detach().cpu() - v) / norm_f64(v) == pytest.approx(LR, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_ratio_of_a_direction_whose_fp32_squares_vanish(backend):
    """Grads of ~1e-30, no weight decay: v = (1 - β2) g² underflows to 0 (in fp32 on both sides), so u = m^ / ε
    ~ 1e-24 and ‖u‖² ~ 1e-48 n; the reference's r = ‖θ‖ / ‖u‖ ~ 1e24 moves the params by lr ‖θ‖ in norm. An fp32
    ‖u‖² = 0 took r = 1 and left them where they were (a step of lr ‖u‖ ~ 1e-26)."""
    values = [torch.randn(300), torch.randn(7, 9)]
    grads = [torch.randn(300) * 1e-30, torch.randn(7, 9) * 1e-30]
    ref_params, ref = same_as_reference(backend, values, grads, weight_decay=0.0)
    for v, p in zip(values, ref_params):
        assert float(ref.state[p]["exp_avg_sq"].abs().max()) == 0.0
        assert norm_f64(p.detach().cpu() - v) / norm_f64(v) == pytest.approx(LR, rel=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # inf / inf, on purpose
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [(0.0, 10.0), (2.0, math.inf)], ids=["0-10", "2-inf"])
def test_nan_trust_ratio_stays_nan_through_the_trust_clip(backend, clip):
    """An inf param with weight decay: ‖θ‖ = ‖u‖ = inf (u = a + λ θ), r = inf / inf = NaN, and the trust clip
    keeps it NaN (the reference: NaN in, NaN out), so the step makes the whole tensor NaN, as it does without a
    clip; the other tensor and the moments are unaffected. A clamp that drops NaN (fmax/fmin, tl.maximum without
    propagate_nan) set r = lo and updated the finite elements."""
    values = [torch.tensor([1.0, 2.0, math.inf, 3.0]), torch.randn(5)]
    grads = [torch.full((4,), 0.1), torch.full((5,), 0.1)]
    ref_params, ref = same_as_reference(backend, values, grads, weight_decay=0.01, trust_clip=clip)
    assert ref_params[0].isnan().all() and ref_params[1].isfinite().all()
    assert all(ref.state[p][k].isfinite().all() for p in ref_params for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_inactive_is_bitwise_noop(backend):
    """max_grad_norm above the global norm: c = 1 exactly, so the result is bitwise that of no clipping; the
    extra grad-norm pass is 2 launches per bucket."""
    results = []
    for mgn in (None, 1e6):
        fused, fp = build(backend, torch.float32, (dict(),), max_grad_norm=mgn)
        for k in range(3):
            for p, g in zip(fp, randn_grads(fp, k)):
                p.grad = g
            count = launches(backend)
            fused.step()
            assert launches(backend) - count == (3 if mgn is None else 5)
        results.append([p.detach().clone() for p in fp] + [fused.state[p]["exp_avg_sq"] for p in fp])
        torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=case_id)
def test_global_grad_norm_accuracy(backend, grad_dtype):
    """The fused Σ g² (GradScaler-unscaled; squares and sums in float64) of a bucket within the derived summation
    bound of the reference's float64 one."""
    shapes = [(4096 * 2 + 7,), (3, 5), (1,), (0,), (777,)]
    params = [torch.randn(s, device=DEVICE).to(grad_dtype).requires_grad_() for s in shapes]
    opt = FusedLAMB(params, backend=backend, max_grad_norm=1.0)
    scale = torch.tensor(256.0, device=DEVICE)
    for p in params:
        p.grad = (torch.randn(p.shape, device=DEVICE) * 100).to(grad_dtype)
    opt.step()  # creates the state; the grads stay as they are (no GradScaler)
    bucket, = opt._collect()
    bucket.states = [opt.state[p] for p in bucket.params]
    fused = backends.grad_sq_norm(bucket, opt.rule, tables=opt._tables, grad_scale=scale)
    exact = fused_optim.reference.grad_sq_norm(bucket.grads, scale)
    assert fused.dtype == torch.float64 and fused.device.type == DEVICE.type
    blocks = sum(n_blocks(p.numel()) for p in params)
    assert abs(float(fused) / float(exact) - 1) <= sum_sq_rel(blocks)
    skipped = backends.grad_sq_norm(bucket, opt.rule, tables=opt._tables, found_inf=torch.ones((), device=DEVICE))
    assert float(skipped) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Two runs from the same inputs are bitwise equal (params, master weights, moments), clipping included."""
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        fused, fp = build(backend, torch.bfloat16, (dict(), dict(layer_adaptation=False)), master=True,
                          max_grad_norm=1.0)
        for k in range(3):
            for p, g in zip(fp, randn_grads(fp, k)):
                p.grad = g
            fused.step()
        runs.append([p.detach().clone() for p in fp]
                    + [v for p in fp for v in fused.state[p].values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", ALL)
def test_grad_scaler(backend):
    """With torch.amp.GradScaler: a step with an inf grad is skipped whole (params, moments, steps, grads stay);
    finite steps unscale the grads (written back unscaled) and, with a power-of-two scale, are bitwise the steps
    of an unscaled run that skips the same step."""
    w = torch.randn(4, 3, device=DEVICE)
    p0 = torch.randn(3, 5, device=DEVICE)
    runs = []
    for scaled in (True, False):
        p = p0.clone().requires_grad_()
        opt = FusedLAMB([p], lr=LR, backend=backend, max_grad_norm=0.5)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10, enabled=scaled)
        for k in range(4):
            opt.zero_grad()
            scaler.scale((w @ p).square().sum()).backward()
            if k == 1:
                if not scaled:
                    continue  # the unscaled run skips the step the scaler skips
                p.grad[0, 0] = math.inf
                before = [p.detach().clone(), p.grad.clone()] + [v.clone() for v in opt.state[p].values()]
                scaler.step(opt)
                after = [p.detach(), p.grad] + list(opt.state[p].values())
                assert all(torch.equal(a, b) for a, b in zip(before, after))
                scaler.update()
                continue
            scaler.step(opt)
            scaler.update()
        runs.append([p.detach().clone(), p.grad.clone()] + list(opt.state[p].values()))
    assert float(runs[0][2]) == 3.0  # step: 3 of 4 applied
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=-1e-6), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(max_grad_norm=0.0), r"invalid max_grad_norm 0\.0: use a finite number > 0"),
    (dict(max_grad_norm=math.inf), "invalid max_grad_norm inf: use a finite number > 0"),
    (dict(trust_clip=(2.0, 1.0)), r"invalid trust_clip \(2\.0, 1\.0\): need 0 <= lo <= hi"),
    (dict(trust_clip=(-1.0, 1.0)), r"invalid trust_clip \(-1\.0, 1\.0\): need 0 <= lo <= hi"),
    (dict(trust_clip=3.0), "trust_clip must be a pair"),
    (dict(layer_adaptation=None), "layer_adaptation must be True or False"),
    (dict(backend="cuda"), "Invalid backend"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLAMB([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="param group 1.*trust_clip"):
        FusedLAMB([dict(params=[p]), dict(params=[q], trust_clip=(1.0, 0.5))])
    with pytest.raises(ValueError, match="param group 1: max_grad_norm.*constructor"):
        FusedLAMB([dict(params=[p]), dict(params=[q], max_grad_norm=2.0)], max_grad_norm=1.0)
    opt = FusedLAMB([p])
    with pytest.raises(ValueError, match="param group 1: invalid beta"):
        opt.add_param_group(dict(params=[q], betas=(0.9, 1.5)))
    assert len(opt.param_groups) == 1  # the failed group is not added
    opt.add_param_group(dict(params=[q], trust_clip=[0, 10], layer_adaptation=False))
    assert opt.param_groups[1]["trust_clip"] == (0.0, 10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_is_read_from_the_groups(backend):
    """max_grad_norm lives in every param group, as torch keeps options, so a state_dict restores it and a step
    reads it there (before, the step read the constructor's value only: a resumed run clipped as its constructor
    said, not as the checkpoint did). Groups that disagree, or an invalid value set in a group, are refused at the
    step, before anything is touched; a group added later takes the optimizer's value."""
    def run(constructed, *, edit=..., load=None, steps=3):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 8).to(DEVICE))
        opt = FusedLAMB([w], lr=1e-2, max_grad_norm=constructed, backend=backend)
        if load is not None:
            opt.load_state_dict(load)
        if edit is not ...:
            opt.param_groups[0]["max_grad_norm"] = edit
        for _ in range(steps):
            w.grad = 1000 * w.detach().clone()  # a global norm far above 0.1
            opt.step()
        return w.detach(), opt

    clipped, _ = run(0.1)
    unclipped, _ = run(None)
    assert not torch.equal(clipped, unclipped)
    assert torch.equal(run(None, edit=0.1)[0], clipped)
    assert torch.equal(run(0.1, edit=None)[0], unclipped)
    _, saved = run(0.1, steps=0)
    assert torch.equal(run(None, load=saved.state_dict())[0], clipped)
    _, saved = run(None, steps=0)
    assert torch.equal(run(0.1, load=saved.state_dict())[0], unclipped)

    p, q = torch.nn.Parameter(torch.ones(4, device=DEVICE)), torch.nn.Parameter(torch.ones(4, device=DEVICE))
    opt = FusedLAMB([p], max_grad_norm=None, backend=backend)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    opt.add_param_group(dict(params=[q]))
    assert opt.param_groups[1]["max_grad_norm"] == 1.0  # the optimizer's, as the groups hold it
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.param_groups[1]["max_grad_norm"] = 2.0
    with pytest.raises(ValueError, match=r"param group 1 has max_grad_norm=2\.0 but param group 0 has 1\.0"):
        opt.step()
    opt.param_groups[0]["max_grad_norm"] = opt.param_groups[1]["max_grad_norm"] = -1.0
    with pytest.raises(ValueError, match=r"param group 0: invalid max_grad_norm -1\.0"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(p.detach(), torch.ones_like(p))  # nothing touched


def test_exported():
    assert fused_optim.FusedLAMB is FusedLAMB and "FusedLAMB" in fused_optim.__all__
    opt = FusedLAMB([torch.zeros(2, requires_grad=True)])
    assert {k: opt.defaults[k] for k in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["max_grad_norm"] is None


# ----------------------------------------------------------------------------------------------------------------
# GPU: sizes that the interpreter cannot afford (benchmarks/gpu_verify.sh runs these), on every fused backend
# that has LAMB's rule on CUDA (BACKENDS: fused_backends of the CUDA device there).
# ----------------------------------------------------------------------------------------------------------------
GPU_SHAPES = [(4096 * 1100 + 5,), (1024, 1023), (3,), (0,), ()]  # 1,101 blocks: segment_sum's chunk loop runs twice


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
def test_gpu_parity_large(backend, dtype):
    # 6 steps, not 20: the float64 bound computation on the host costs ~1 s per step for these 5.2M elements, and
    # the whole GPU suite must fit benchmarks/gpu_verify.sh's budget. The 20-step runs are the CPU parity tests.
    parity(backend, dtype, (dict(weight_decay=0.01), dict(layer_adaptation=False)), shapes=GPU_SHAPES,
           grad_scales=[1.0] * len(GPU_SHAPES), master=dtype != torch.float32, max_grad_norm=64.0, exact_grads=True,
           steps=6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_deterministic_large(backend):
    runs = []
    for _ in range(3):
        torch.manual_seed(5)
        fused, fp = build(backend, torch.float32, (dict(),), shapes=GPU_SHAPES, max_grad_norm=1.0)
        for k in range(3):
            for p, g in zip(fp, randn_grads(fp, k)):
                p.grad = g
            fused.step()
        runs.append([p.detach().clone() for p in fp])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
def test_gpu_cuda_graph_replay_matches_eager(backend, dtype, master):
    """A captured step (three passes, the global-norm pass, a tensor lr) replays bitwise as the eager step."""
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(4)
    pg = [torch.randn(s, generator=gen).to(cuda, dtype).requires_grad_() for s in [(), (1,), (0,), (4097,), (33, 65)]]
    pe = [p.detach().clone().requires_grad_() for p in pg]
    lr = torch.tensor(LR, device=cuda)
    kw = dict(backend=backend, master_weights=master, max_grad_norm=2.0, trust_clip=(0.0, 5.0))
    og = FusedLAMB([dict(params=pg[:3], layer_adaptation=False), dict(params=pg[3:])], lr=lr, **kw)
    # The captured step reads lr from an fp32 tensor: the eager step gets the same fp32 value as a float.
    oe = FusedLAMB([dict(params=pe[:3], layer_adaptation=False), dict(params=pe[3:])], lr=float(lr), **kw)
    static = [torch.zeros_like(p) for p in pg]
    for p, s in zip(pg, static):
        p.grad = s
    g_gen = torch.Generator(device=cuda).manual_seed(1)

    def feed():
        for s, p in zip(static, pe):
            g = torch.randn(p.shape, device=cuda, generator=g_gen).to(dtype)
            s.copy_(g)
            p.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: state and device tables are created outside the capture
            feed()
            og.step()
            oe.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    for k in range(10):
        new_lr = LR if k < 5 else 3e-3
        lr.fill_(new_lr)
        for group in oe.param_groups:
            group["lr"] = float(lr)
        feed()
        graph.replay()
        oe.step()
    torch.cuda.synchronize()
    for a, b in zip(pg, pe):
        assert torch.equal(a, b)
        assert float(og.state[a]["step"]) == float(oe.state[b]["step"]) == 13


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_step_never_synchronizes_with_the_host(backend):
    """torch's sync debug mode raises on any host-device synchronization: steps with max_grad_norm, a tensor lr,
    GradScaler tensors, and a table rebuild."""
    cuda = torch.device("cuda")
    params = [torch.randn(s, device=cuda).requires_grad_() for s in [(), (4097,), (33, 65)]]
    opt = FusedLAMB(params, lr=torch.tensor(LR, device=cuda), backend=backend, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # lazy state init outside the checked region
    torch.cuda.synchronize()
    scale, found = torch.tensor(4.0, device=cuda), torch.tensor(0.0, device=cuda)  # made before the check: a copy
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.grad_scale, opt.found_inf = scale, found
        opt.step()
        del opt.grad_scale, opt.found_inf
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert float(opt.state[params[0]]["step"]) == 4
