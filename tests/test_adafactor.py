"""FusedAdafactor: every usable fused backend against the reference, step by step over 20 steps (params and every
state tensor, awkward shapes, every option, fp32/bf16, master weights, lr as a device tensor, params under the
eps2 floor, steps past 10^4 where the relative step takes its 1/sqrt(t) cap, overflowed params with NaN and ±inf
where the reference has them); the reference against an independent float64 oracle written here from the formula
of issue 5 (and against transformers' Adafactor when it is installed); state memory; bitwise-deterministic reruns;
GradScaler; launches per step; validation. Tolerances: tests/tolerances.py, ADAFACTOR_NOTES (derived there;
checked here at every step).

Interpreter budget (TRITON_INTERPRET, ~10-25 ms per program): a step is 3 tile passes (one program per
32 x 128 tile) plus 4 small launches, so the option variants run on a 4-tile shape set and the awkward shapes
once per dtype.
    pytest tests/test_adafactor.py -q
"""
import math

import pytest
import torch

import fused_optim
from cases import case_id, fused_backends
from conftest import DEVICE
from fused_optim import testing
from test_parity import GRAD_SCALES, clone_params, make_params
from tolerances import EPS32, assert_same_nonfinite

BACKENDS = fused_backends(rule="adafactor")
STEPS = 20

# 0-d, one element, odd 1-D crossing a 4096-element flat tile, tall (crosses a 32-row tile), wide and crossing
# both tile dims (one full 32 x 128 tile), 1 x n, n x 1 (crosses 32 rows), 3-D and 4-D (leading dims are
# batches), zero-size 1-D and matrix. Gradient scales span 1e-3 .. 1e2 across tensors (GRAD_SCALES).
SHAPES = [(), (37,), (4097,), (40, 6), (33, 129), (1, 67), (33, 1), (2, 3, 5), (2, 1, 3, 5), (0,), (0, 5)]
SMALL = [(37,), (3, 17), (2, 5, 9)]  # 4 tiles: flat, a matrix, a batch of two

VARIANTS = {
    "default": dict(),
    "warmup-beta1-wd": dict(warmup_init=True, beta1=0.9, weight_decay=0.1),
    # lr given (a device tensor in the test), no parameter scaling, clipping active (d = 0.25 < RMS(U) ~ 1)
    "lr-unscaled-clip-wd": dict(relative_step=False, lr=5e-2, scale_parameter=False, clip_threshold=0.25,
                                weight_decay=0.05),
    # momentum with β1 < 0.5, another decay exponent, an ε1 that matters for the 1e-3-scaled grads
    "lr-beta1-decay-eps": dict(relative_step=False, lr=3e-2, beta1=0.3, decay_rate=-0.5, eps=(1e-3, 1e-2),
                               weight_decay=0.02),
}


def run_pair(shapes, dtype, variant, backend, *, master=False, lr_tensor=False, steps=STEPS, **options):
    """Step a fused-backend optimizer and a reference one on identical grads; after every step, check the gaps
    of params and state against the bounds of ADAFACTOR_NOTES (fused_optim/testing.py). ``options``:
    adafactor_parity's param_scales and late_step. Returns both."""
    run, checks = testing.adafactor_parity(fused_optim.FusedAdafactor, backend, dtype, variant, shapes=shapes,
                                           grad_scales=GRAD_SCALES * 2, device=DEVICE, steps=steps, master=master,
                                           lr_tensor=lr_tensor, **options)
    assert checks, "nothing was compared"
    for what, error, bound in checks:
        assert error <= bound, f"{what}: gap {error:.3g} over its bound {bound:.3g}"
    return run.fused, run.ref, run.fused_params, run.ref_params


def _moved(params_before, params):
    return any(not torch.equal(a, b.detach()) for a, b in zip(params_before, params) if b.numel())


# (backend, dtype): fp32 and bf16 on every backend; fp16 too on native, which needs no interpreter budget.
SHAPE_CASES = [(b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16)]
if "native" in BACKENDS:
    SHAPE_CASES.append(("native", torch.float16))


@pytest.mark.parametrize("backend,dtype", SHAPE_CASES, ids=[f"{b}-{case_id(d)}" for b, d in SHAPE_CASES])
def test_parity_shapes(backend, dtype):
    """Awkward shapes with the default options (relative step, parameter scaling, clipping at 1). bf16 on triton
    runs the 4-tile set: the rounding paths do not depend on the shape, and the interpreter runs one call per tile;
    native runs every shape in every dtype."""
    shapes = SHAPES if dtype == torch.float32 or backend == "native" else SMALL
    start = [p.clone() for p in make_params(dtype, shapes=shapes)]
    fused, ref, pf, pr = run_pair(shapes, dtype, VARIANTS["default"], backend)
    assert _moved(start, pf), "the test did not move any param"
    for p in pf:
        st = fused.state[p]
        assert ("exp_avg_sq_row" in st) == (p.dim() >= 2) and ("exp_avg_sq" in st) == (p.dim() < 2)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native backend is not usable here")
def test_native_parity_wide_matrices():
    """Matrices wider than one band pass of the CPU engine (csrc/cpu/tile_map_cpu.h: up to 32 column tiles of 128,
    4,096 columns, run row by row together), so that a band is split into several passes."""
    shapes = [(40, 4500), (2, 3, 4200)]
    start = [p.clone() for p in make_params(torch.float32, shapes=shapes)]
    _, _, pf, _ = run_pair(shapes, torch.float32, VARIANTS["default"], "native")
    assert _moved(start, pf), "the test did not move any param"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "default"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_options(backend, variant):
    run_pair(SMALL, torch.float32, VARIANTS[variant], backend, lr_tensor="lr" in VARIANTS[variant])


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_bf16_master_weights(backend):
    """The parity bound on a bf16 param with master weights allows its own rounding (one ulp), so the rounding
    itself is checked exactly: the param is its master rounded to nearest even, as ``.to(torch.bfloat16)``."""
    fused, _, pf, _ = run_pair(SMALL, torch.bfloat16, VARIANTS["lr-beta1-decay-eps"], backend, master=True)
    for i, p in enumerate(pf):
        master = fused.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(p.detach(), master.to(torch.bfloat16)), f"param {i} is not its master rounded to nearest"


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_params_under_the_eps2_floor(backend):
    """A zero param and one of RMS ~1e-4 (biases, norms, fresh embeddings): α = ρ max(eps2, RMS(θ)) takes its
    floor eps2 = 1e-3 there (randn params, RMS ~1, never reach it), and the zero param moves at all only
    through it."""
    _, _, pf, pr = run_pair(SMALL, torch.float32, VARIANTS["default"], backend, param_scales=[0.0, 1e-4, 1.0])
    assert torch.count_nonzero(pf[0]) == pf[0].numel(), "the zero param did not move"
    # Both start under the floor (RMS 0 and ~1e-4) and move by about ρ eps2 = 1e-5 per element and step: still
    # under it after the 20 steps, so every step took the floor.
    rms = [float(p.detach().square().mean().sqrt()) for p in pr[:2]]
    assert all(r < 1e-3 for r in rms), rms


@pytest.mark.parametrize("variant", ["default", "warmup-beta1-wd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_late_steps(backend, variant):
    """Steps 40,001 on: the relative step size ρ = min(1e-2, 1/sqrt(t)) (warmup: min(1e-6 t, 1/sqrt(t))) takes its
    1/sqrt(t) cap only after t = 10^4, which the 20-step runs never reach."""
    from fused_optim.reference.adafactor import relative_step_size
    late = 40_000
    run_pair(SMALL, torch.float32, VARIANTS[variant], backend, steps=4, late_step=late)
    warmup = VARIANTS[variant].get("warmup_init", False)
    assert relative_step_size(late + 1, lr=None, relative_step=True, warmup_init=warmup) == 1 / math.sqrt(late + 1)


# inf - inf, 0 * inf and overflow are this test's point; Triton's interpreter (numpy) warns on each
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("variant", [dict(), dict(weight_decay=0.1, beta1=0.9)], ids=["no-decay", "decay-beta1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflowed_param_gives_the_reference_nan_and_inf(backend, variant):
    """Params whose Σθ² is inf: fp16 params that overflowed to ±inf, and finite fp32 ones of 1e20 (θ² overflows fp32).
    Then RMS(θ) = inf, α = ρ·RMS(θ) = inf and the update is ±inf: the reference gives θ - update = ∓inf, and NaN
    only where θ was inf of the update's sign. It decays only when λ != 0; the fused kernels decayed when the
    coefficient -λα was nonzero, and with λ = 0 that is 0·inf = NaN: every element came out NaN. Two steps (the
    second from params holding ±inf and NaN); the param and every state tensor with NaN and ±inf at exactly the
    reference's elements, the finite statistics within the first-step gaps of ADAFACTOR_NOTES at step t."""
    inf = float("inf")

    def mk():
        return [torch.tensor([1.0, 2.0, inf, 3.0], device=DEVICE).half().requires_grad_(),
                torch.tensor([[1.0, -inf, 2.0, 0.5, -1.0], [3.0, 4.0, 5.0, inf, 6.0], [0.0, -2.0, 1.0, 1.0, 2.0]],
                             device=DEVICE).half().requires_grad_(),
                torch.full((2, 3), 1e20, device=DEVICE).requires_grad_()]
    pf, pr = mk(), mk()
    fused = fused_optim.FusedAdafactor(pf, backend=backend, **variant)
    ref = fused_optim.FusedAdafactor(pr, backend="reference", **variant)
    for t in (1, 2):
        for p, q in zip(pf, pr):
            p.grad = torch.randn(p.shape, device=DEVICE).to(p.dtype)
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
        for i, (p, q) in enumerate(zip(pf, pr)):
            assert_same_nonfinite(p.detach(), q.detach(), f"param {i} step {t}")
            assert not torch.isfinite(q).any(), "an element of the test stayed finite: compare it with a bound"
            assert t > 1 or not torch.isnan(q).all(), "the reference's first step should leave ±inf, not only NaN"
            st_f, st_r = fused.state[p], ref.state[q]
            assert set(st_f) == set(st_r) and float(st_f["step"]) == float(st_r["step"]) == t
            if "exp_avg" in st_r:
                assert_same_nonfinite(st_f["exp_avg"], st_r["exp_avg"], f"param {i} exp_avg step {t}")
                assert not torch.isfinite(st_r["exp_avg"]).any(), "a finite exp_avg: compare it with a bound"
            # The statistics of g² see no param: finite, within their relative gaps (as in adafactor_parity).
            gaps = testing.adafactor_gaps(tuple(q.shape), t)
            for key, rel in (("exp_avg_sq_row", gaps.get("row")), ("exp_avg_sq_col", gaps.get("col")),
                             ("exp_avg_sq", gaps.get("V"))):
                if key in st_r:
                    finite = assert_same_nonfinite(st_f[key], st_r[key], f"param {i} {key} step {t}")
                    assert finite.all()
                    gap = (st_f[key].double() - st_r[key].double()).abs()
                    assert (gap <= rel * st_r[key].double().abs()).all(), f"param {i} {key} step {t}"


# ----------------------------------------------------------------------------------------------------------------
# The reference against an independent oracle: issue 5's formula, float64, plain Python loops.
# ----------------------------------------------------------------------------------------------------------------
class Oracle:
    """Adafactor as written in issue 5 (Shazeer & Stern 2018, transformers' semantics), one element at a time."""

    def __init__(self, shape, *, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False):
        self.shape, self.t = tuple(shape), 0
        self.hp = dict(lr=lr, eps1=eps[0], eps2=eps[1], d=clip_threshold, c=decay_rate, beta1=beta1,
                       lam=weight_decay, scale=scale_parameter, relative=relative_step, warmup=warmup_init)
        self.factored = len(self.shape) >= 2
        if self.factored:
            self.n, self.m = self.shape[-2], self.shape[-1]
            self.batches = math.prod(self.shape[:-2])
            self.R = [[0.0] * self.n for _ in range(self.batches)]
            self.C = [[0.0] * self.m for _ in range(self.batches)]
        else:
            self.V = [0.0] * math.prod(self.shape)
        self.mom = [0.0] * math.prod(self.shape)

    def step(self, theta: list, g: list) -> list:
        h = self.hp
        self.t += 1
        t, N = self.t, len(theta)
        if h["relative"]:
            rho = min(1e-6 * t if h["warmup"] else 1e-2, 1.0 / math.sqrt(t))
        else:
            rho = h["lr"]
        rms_theta = math.sqrt(sum(x * x for x in theta) / N)
        alpha = rho * max(h["eps2"], rms_theta) if h["scale"] else rho
        beta2 = 1.0 - t ** h["c"]
        sq = [x * x + h["eps1"] for x in g]
        U = [0.0] * N
        if self.factored:
            n, m = self.n, self.m
            for b in range(self.batches):
                at = lambda i, j: b * n * m + i * m + j  # noqa: E731
                for i in range(n):
                    row_mean = sum(sq[at(i, j)] for j in range(m)) / m
                    self.R[b][i] = beta2 * self.R[b][i] + (1 - beta2) * row_mean
                for j in range(m):
                    col_mean = sum(sq[at(i, j)] for i in range(n)) / n
                    self.C[b][j] = beta2 * self.C[b][j] + (1 - beta2) * col_mean
                mean_r = sum(self.R[b]) / n
                for i in range(n):
                    for j in range(m):
                        v_hat = self.R[b][i] * self.C[b][j] / mean_r
                        U[at(i, j)] = g[at(i, j)] / math.sqrt(v_hat)
        else:
            for k in range(N):
                self.V[k] = beta2 * self.V[k] + (1 - beta2) * sq[k]
                U[k] = g[k] / math.sqrt(self.V[k])
        rms_u = math.sqrt(sum(x * x for x in U) / N)
        U = [alpha * x / max(1.0, rms_u / h["d"]) for x in U]
        if h["beta1"] is not None:
            self.mom = [h["beta1"] * mk + (1 - h["beta1"]) * uk for mk, uk in zip(self.mom, U)]
            U = list(self.mom)
        return [x - h["lam"] * alpha * x - uk for x, uk in zip(theta, U)]


ORACLE_SHAPES = [(), (7,), (5, 3), (1, 6), (6, 1), (2, 3, 4), (2, 1, 2, 3)]
ORACLE_CONFIGS = {**VARIANTS, "unscaled-clip-beta1_0": dict(scale_parameter=False, clip_threshold=0.5, beta1=0.0)}
ORACLE_STEPS = 12
# float64 against float64 over 12 steps, ~60 rounded operations per element and step, |θ| <~ 4: ~1e-13 at most;
# 1e-11 leaves room for the different summation orders without hiding a formula difference (that would show
# at the scale of one update, ~1e-2 |θ|).
F64_ATOL = 1e-11


# A zero param (1, 6) and one of RMS ~1e-4 (6, 1): RMS(θ) under eps2, so α takes its floor ρ eps2 there.
ORACLE_PARAM_SCALES = [1.0, 1.0, 1.0, 0.0, 1e-4, 1.0, 1.0]


def _f64_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * c).requires_grad_()
            for s, c in zip(ORACLE_SHAPES, ORACLE_PARAM_SCALES)]


def _f64_grads(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64) * GRAD_SCALES[i % len(GRAD_SCALES)]
            for i, s in enumerate(ORACLE_SHAPES)]


def _step_side_by_side(a, b, ours, theirs, steps):
    """Step optimizer ``a`` (of params ``ours``) and ``b`` (of ``theirs``) on the same float64 grads, those of each
    step number in ``steps``."""
    for k in steps:
        for p, q, g in zip(ours, theirs, _f64_grads(k)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()


@pytest.mark.parametrize("late", [None, 40_000], ids=["early", "late"])
@pytest.mark.parametrize("config", ORACLE_CONFIGS.values(), ids=ORACLE_CONFIGS.keys())
def test_reference_matches_float64_oracle(config, late):
    """``late``: after the first step both step counts jump to 40,000, where the relative step size takes its
    1/sqrt(t) cap (after t = 10^4; the early steps never reach it)."""
    params = _f64_params(0)
    oracles = [Oracle(p.shape, **config) for p in params]
    thetas = [p.detach().reshape(-1).tolist() for p in params]
    opt = fused_optim.FusedAdafactor(params, backend="reference", **config)
    for k in range(ORACLE_STEPS):
        if k == 1 and late is not None:
            for p, o in zip(params, oracles):
                opt.state[p]["step"].fill_(late)
                o.t = late
        grads = _f64_grads(k)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        thetas = [o.step(th, g.reshape(-1).tolist()) for o, th, g in zip(oracles, thetas, grads)]
    for i, (p, o, th) in enumerate(zip(params, oracles, thetas)):
        want = torch.tensor(th, dtype=torch.float64).reshape(p.shape)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=F64_ATOL, msg=lambda m: f"param {i}: {m}")
        st = opt.state[p]
        wants = ({"exp_avg_sq_row": sum(o.R, []), "exp_avg_sq_col": sum(o.C, [])} if o.factored
                 else {"exp_avg_sq": o.V})
        for key, values in wants.items():
            torch.testing.assert_close(st[key].reshape(-1), torch.tensor(values, dtype=torch.float64),
                                       rtol=1e-12, atol=0, msg=lambda m: f"param {i} {key}: {m}")


def test_oracle_would_catch_a_formula_change():
    """The oracle comparison can fail: a decay exponent of -0.7 instead of -0.8 moves the params past F64_ATOL."""
    params = _f64_params(0)
    oracles = [Oracle(p.shape, decay_rate=-0.7) for p in params]
    thetas = [p.detach().reshape(-1).tolist() for p in params]
    opt = fused_optim.FusedAdafactor(params, backend="reference")
    for k in range(3):
        grads = _f64_grads(k)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        thetas = [o.step(th, g.reshape(-1).tolist()) for o, th, g in zip(oracles, thetas, grads)]
    worst = max((p.detach().reshape(-1) - torch.tensor(th, dtype=torch.float64)).abs().max().item()
                for p, th in zip(params, thetas))
    assert worst > 100 * F64_ATOL


@pytest.mark.parametrize("config", ORACLE_CONFIGS.values(), ids=ORACLE_CONFIGS.keys())
def test_reference_matches_transformers(config):
    """transformers' Adafactor in float64: same formula, same order of operations, so ~1e-16 relative."""
    transformers_optimization = pytest.importorskip("transformers.optimization")
    ours, theirs = _f64_params(0), _f64_params(0)
    a = fused_optim.FusedAdafactor(ours, backend="reference", **config)
    b = transformers_optimization.Adafactor(theirs, **config)
    _step_side_by_side(a, b, ours, theirs, range(ORACLE_STEPS))
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, rtol=0, atol=F64_ATOL, msg=lambda m: f"param {i}: {m}")
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
            assert (key in a.state[p]) == (key in b.state[q]), key
            if key in b.state[q]:
                torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=1e-12, atol=1e-300)


def test_state_dict_from_transformers():
    """A transformers Adafactor state_dict (int step, an extra RMS entry) loads and training continues alike."""
    transformers_optimization = pytest.importorskip("transformers.optimization")
    ours, theirs = _f64_params(0), _f64_params(0)
    config = dict(beta1=0.9, weight_decay=0.1)
    warm = transformers_optimization.Adafactor(ours, **config)
    ref = transformers_optimization.Adafactor(theirs, **config)
    _step_side_by_side(warm, ref, ours, theirs, range(4))
    opt = fused_optim.FusedAdafactor(ours, backend="reference", **config)
    opt.load_state_dict(warm.state_dict())
    assert opt.state[ours[3]]["step"].dtype == torch.float32 and float(opt.state[ours[3]]["step"]) == 4
    _step_side_by_side(opt, ref, ours, theirs, range(4, 8))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=F64_ATOL)


def test_state_dict_in_transformers_format_loads():
    """Without transformers installed, its state_dict format by hand: ``step`` a Python int and an extra ``RMS``
    entry per param (transformers' Adafactor keeps both). It loads (step back to an fp32 tensor) and training
    continues bitwise as from our own state_dict."""
    config = dict(beta1=0.9, weight_decay=0.1)
    ours, theirs = _f64_params(0), _f64_params(0)
    a = fused_optim.FusedAdafactor(ours, backend="reference", **config)
    for k in range(4):
        for p, g in zip(ours, _f64_grads(k)):
            p.grad = g.clone()
        a.step()
    sd = a.state_dict()
    foreign = {"param_groups": sd["param_groups"], "state": {
        i: {**{k: (int(v) if k == "step" else v.clone()) for k, v in st.items()}, "RMS": torch.tensor(0.5)}
        for i, st in sd["state"].items()}}
    assert all(type(st["step"]) is int and "RMS" in st for st in foreign["state"].values())
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(p)
    b = fused_optim.FusedAdafactor(theirs, backend="reference", **config)
    b.load_state_dict(foreign)
    assert all(b.state[q]["step"].dtype == torch.float32 and float(b.state[q]["step"]) == 4 for q in theirs)
    _step_side_by_side(a, b, ours, theirs, range(4, 8))
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------------------------
# Memory, determinism, launches, GradScaler, validation.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_factored_state_is_rows_plus_columns(backend):
    """An n x m matrix keeps n + m floats of second-moment state (per matrix of a batch), no n x m tensor; the
    step's scratch buffers are O(n + m + tiles), not O(n m)."""
    shapes = [(64, 300), (3, 10, 7)]
    params = [torch.randn(s, device=DEVICE).requires_grad_() for s in shapes]
    opt = fused_optim.FusedAdafactor(params, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
        assert st["exp_avg_sq_row"].shape == p.shape[:-1] and st["exp_avg_sq_col"].shape == p.shape[:-2] + p.shape[-1:]
        state_floats = sum(v.numel() for k, v in st.items() if k != "step")
        batches = math.prod(p.shape[:-2])
        assert state_floats == batches * (p.shape[-2] + p.shape[-1]) < p.numel()
    (table,) = opt._tables.values()
    tile_r, tile_c = table.tile
    scratch = sum(buf.numel() for buf in table.work.values())
    numel = sum(p.numel() for p in params)
    rows_cols = sum(math.prod(p.shape[:-2]) * (p.shape[-2] + p.shape[-1]) for p in params)
    # partials: one per (row, column tile) and (column, row tile), one per tile; statistics: rows + columns
    assert scratch <= 2 * rows_cols + numel / tile_c + numel / tile_r + 3 * table.n_tiles + 4 * len(params) + 64
    assert scratch < numel / 4


def test_tile_table_names_its_matrix_and_flat_tensors():
    """TileTable.factored keeps which tensors carry row/column statistics (rank >= 2 with elements) and which are
    flat with elements: the native launcher takes the factored and unfactored states in these orders."""
    from fused_optim.tables import TILE_META_FIELDS, TileTable

    shapes = [(), (0,), (0, 5), (3, 4), (7,), (2, 3, 4), (1, 1)]
    table = TileTable.factored({"param": [torch.zeros(s) for s in shapes]}, torch.device("cpu"))
    assert table.matrices == (3, 5, 6) and table.flats == (0, 4)
    matrix_flags = table.meta[:, list(TILE_META_FIELDS).index("matrix")].tolist()
    assert [i for i, f in enumerate(matrix_flags) if f] == list(table.matrices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reruns_are_bitwise_equal(backend):
    """Row/column statistics and RMS sums are reduced in a fixed order: two runs agree bit for bit."""
    def run():
        torch.manual_seed(7)
        params = [torch.randn(s, device=DEVICE).requires_grad_() for s in SMALL]
        opt = fused_optim.FusedAdafactor(params, beta1=0.5, backend=backend)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params, opt
    (pa, oa), (pb, ob) = run(), run()
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for key in oa.state[a]:
            assert torch.equal(oa.state[a][key], ob.state[b][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_roundtrip_continues_bitwise(backend):
    """Saved after 2 steps and loaded into a new optimizer (new state storage: the tile table is rebuilt), the
    next 2 steps are bitwise those of an uninterrupted run."""
    import io
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=gen).to(DEVICE) for s in SMALL] for _ in range(4)]

    def params():
        g = torch.Generator().manual_seed(4)
        return [torch.randn(s, generator=g).to(DEVICE).requires_grad_() for s in SMALL]

    def steps(opt, ps, ks):
        for k in ks:
            for p, g in zip(ps, grads[k]):
                p.grad = g.clone()
            opt.step()
    a, b = params(), params()
    steps(fused_optim.FusedAdafactor(a, beta1=0.9, backend=backend), a, range(4))
    first = fused_optim.FusedAdafactor(b, beta1=0.9, backend=backend)
    steps(first, b, range(2))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = fused_optim.FusedAdafactor(b, beta1=0.9, backend=backend)
    second.load_state_dict(torch.load(buf, weights_only=True))
    steps(second, b, range(2, 4))
    for p, q in zip(a, b):
        assert torch.equal(p, q) and float(second.state[q]["step"]) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_launches_per_step_do_not_grow_with_tensors(backend):
    if backend == "triton":
        from fused_optim.kernels.engine import LAUNCHES
    else:
        from fused_optim.native import LAUNCHES  # operator calls: each is one kernel launch (CUDA) or CPU pass

    def launches(shapes):
        params = [torch.randn(s, device=DEVICE).requires_grad_() for s in shapes]
        opt = fused_optim.FusedAdafactor(params, backend=backend)
        for p in params:
            p.grad = torch.randn_like(p)
        before = LAUNCHES["count"]
        opt.step()
        return LAUNCHES["count"] - before
    assert launches([(3, 4), (5,)]) == launches([(3, 4)] * 6 + [(5,)] * 6) == 7
    assert launches([(5,), ()]) == 5  # no matrix: no row/column statistics to finish


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skip_and_unscale(backend):
    """found_inf set: nothing moves, step included. Then a scaled grad: the same step as the reference on the
    unscaled grad, and the grad written back unscaled."""
    shapes = [(3, 5), (4,)]
    pf = make_params(torch.float32, shapes=shapes)
    pr = clone_params(pf)
    fused = fused_optim.FusedAdafactor(pf, backend=backend)
    ref = fused_optim.FusedAdafactor(pr, backend="reference")
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    for p, g in zip(pf, grads):
        p.grad = g * 1024
    fused.grad_scale = torch.tensor(1024.0, device=DEVICE)
    fused.found_inf = torch.tensor(1.0, device=DEVICE)
    fused.step()
    for p, q in zip(pf, pr):
        assert torch.equal(p, q), "a skipped step moved a param"
        assert float(fused.state[p]["step"]) == 0
        assert all(torch.count_nonzero(v) == 0 for k, v in fused.state[p].items() if k != "step")
    fused.found_inf.zero_()
    fused.step()
    before = [q.detach().double().clone() for q in pr]
    for q, g in zip(pr, grads):
        q.grad = g.clone()
    ref.step()
    for p, q, g, q0 in zip(pf, pr, grads, before):
        assert torch.equal(p.grad, g), "the grad is written back unscaled"
        assert float(fused.state[p]["step"]) == 1
        # The update is nearly invariant to the grad's scale (eps1 = 1e-30 << g²), so the statistics are what
        # show an unscaled grad: scaled, R, C and V would be 1024² too large. First-step gaps of ADAFACTOR_NOTES
        # (fused_optim/testing.py, adafactor_gaps), as adafactor_parity checks them.
        gaps = testing.adafactor_gaps(tuple(q.shape), 1)
        st_f, st_r = fused.state[p], ref.state[q]
        for key, rel in (("exp_avg_sq_row", gaps.get("row")), ("exp_avg_sq_col", gaps.get("col")),
                         ("exp_avg_sq", gaps.get("V"))):
            if key in st_r:
                gap = (st_f[key].double() - st_r[key].double()).abs()
                assert (gap <= rel * st_r[key].double().abs()).all(), f"{key}: {gap.max().item():.3g}"
        # The param: adafactor_parity's first-step bound (both start equal; no weight decay): the update's
        # relative gap times its size, plus the rounding of θ - update.
        step = (q.detach().double() - q0).abs().max().item()
        bound = gaps["update"] * step + 4 * EPS32 * max(q.detach().abs().max().item(), q0.abs().max().item())
        assert (p.detach().double() - q.detach().double()).abs().max().item() <= bound


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=1e-3), "cannot combine a manual lr"),
    (dict(relative_step=False), "needs an external learning rate"),
    (dict(relative_step=False, lr=1e-3, warmup_init=True), "warmup_init=True requires relative_step=True"),
    (dict(relative_step=False, lr=-1.0), "Invalid learning rate"),
    (dict(eps=1e-30), "eps must be a pair"),
    (dict(eps=(1e-30, -1.0)), "eps values must be >= 0"),
    (dict(clip_threshold=0.0), "clip_threshold must be > 0"),
    (dict(decay_rate=0.5), "decay_rate must be <= 0"),
    (dict(beta1=1.0), "beta1 must be None or in"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_optim.FusedAdafactor([torch.nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_signature_matches_transformers():
    import inspect
    transformers_optimization = pytest.importorskip("transformers.optimization")
    ours = inspect.signature(fused_optim.FusedAdafactor.__init__).parameters
    theirs = inspect.signature(transformers_optimization.Adafactor.__init__).parameters
    for name, par in theirs.items():
        assert name in ours and ours[name].default == par.default, name
    assert list(ours)[: len(theirs)] == list(theirs)


# ----------------------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_verify.sh): the parity and determinism tests above also run on CUDA when present.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", fused_backends(torch.device("cuda"), rule="adafactor") if torch.cuda.is_available() else ["triton"])
def test_gpu_parity_large_shapes(backend):
    """GPT-2-like shapes: tiles in the thousands, long row/column segments, a tensor of 2^20 elements."""
    run_pair([(768, 2304), (4, 256, 320), (3072,), (2 ** 20,)], torch.float32, VARIANTS["warmup-beta1-wd"],
             backend, steps=STEPS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fused_backends(torch.device("cuda"), rule="adafactor") if torch.cuda.is_available() else ["triton"])
def test_gpu_cuda_graph_replay_matches_eager(backend):
    """A whole step (seven launches, all scalars on the device) captured once and replayed: bitwise equal to
    eager steps."""
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    shapes = [(256, 384), (2, 33, 129), (1000,), ()]
    pg = [torch.randn(s, generator=gen).to(cuda).requires_grad_() for s in shapes]
    pe = [p.detach().clone().requires_grad_() for p in pg]
    og = fused_optim.FusedAdafactor(pg, beta1=0.9, weight_decay=0.01, backend=backend)
    oe = fused_optim.FusedAdafactor(pe, beta1=0.9, weight_decay=0.01, backend=backend)
    static = [torch.zeros_like(p) for p in pg]
    for p, s in zip(pg, static):
        p.grad = s
    dgen = torch.Generator(device=cuda).manual_seed(1)

    def feed():
        for s, p in zip(static, pe):
            g = torch.randn(s.shape, device=cuda, generator=dgen)
            s.copy_(g)
            p.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # state, tables and scratch buffers are created outside the capture
            feed()
            og.step()
            oe.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    for _ in range(8):
        feed()
        graph.replay()
        oe.step()
    torch.cuda.synchronize()
    for a, b in zip(pg, pe):
        assert torch.equal(a, b)
        assert torch.equal(og.state[a]["step"], oe.state[b]["step"])
