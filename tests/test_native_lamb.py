"""The native LAMB beyond the shared tests (tests/test_lamb.py runs native like every fused backend: parity on params
and state over 20 steps for fp32/bf16/fp16 and master weights, end to end, 1,000 tensors, GradScaler, clipping):
one step replayed operation by operation, the norms in the engines' documented summation order included, must
match bit for bit; bitwise determinism across runs, threads and CPU ISAs; segment_sum's fixed order; the ops' own
argument checks and mutation annotations.

Runs on CPU tensors (the CPU engine runs the same rule as the CUDA kernels): ``python -m pytest
tests/test_native_lamb.py -q`` (about 10 s). The CUDA sources are compile-checked by test_native_build.py.
"""
import math

import pytest
import torch

import fused_optim
from fused_optim import FusedLAMB, backends, native
from fused_optim.reference.lamb import clip_coefficient
from fused_optim.tables import DEFAULT_BLOCK, TensorTable
from test_native import _bitwise_equal, _f32, _fma

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(backends.unusable_for("native", CPU, "lamb") is not None,
                                reason=f"native LAMB unusable: {backends.unusable_for('native', CPU, 'lamb')}")

CPU_LANES = 128  # csrc/engine.h kCpuLanes
SEGMENT_LANES = 1024  # csrc/engine.h kSegmentLanes


# ----------------------------------------------------------------------------------------------------------------
# The summation order of csrc/engine.h, replayed with one float64 rounding per addition.
# ----------------------------------------------------------------------------------------------------------------
def _tree(x: torch.Tensor) -> torch.Tensor:
    """Pairwise tree over a power-of-two number of float64 lanes: lanes k and k + w for w = n / 2, n / 4, ..., 1."""
    while x.numel() > 1:
        half = x.numel() // 2
        x = x[:half] + x[half:]
    return x[0]


def _lanes(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """Lane k adds x[k], x[k + lanes], ... in order, from +0 (the padding adds +0: exact)."""
    rows = torch.nn.functional.pad(x, (0, -x.numel() % lanes)).view(-1, lanes)
    acc = torch.zeros(lanes, dtype=torch.float64)
    for row in rows:
        acc = acc + row
    return acc


def block_partials(contrib: torch.Tensor, block: int = DEFAULT_BLOCK) -> list:
    """The CPU engine's per-block partial sums of one tensor's float64 contributions (an empty tensor: one 0)."""
    contrib = contrib.reshape(-1)
    assert contrib.dtype == torch.float64
    if contrib.numel() == 0:
        return [torch.tensor(0.0, dtype=torch.float64)]
    return [_tree(_lanes(contrib[s:s + block], CPU_LANES)) for s in range(0, contrib.numel(), block)]


def segment_total(partials: list) -> torch.Tensor:
    """segment_sum of one segment: 1,024 lanes, then the full 1,024-lane tree (the CPU engine trims the tree to the
    segment's length: the same bits, which this checks)."""
    return _tree(_lanes(torch.stack(partials).double(), SEGMENT_LANES))


def _sq(x: torch.Tensor) -> torch.Tensor:
    """The contributions of csrc/lamb_rule.h: each fp32 value widened to float64 and squared there (exact)."""
    return x.double() * x.double()


# ----------------------------------------------------------------------------------------------------------------
# One LAMB step, operation by operation as csrc/lamb_rule.h (and kernels/lamb.py) do it.
# ----------------------------------------------------------------------------------------------------------------
def _sqrt_rn(x):
    return x.double().sqrt().float()  # fp64 sqrt rounded to fp32: correctly rounded (torch's fp32 sqrt may not be)


def _lamb_ops(tensors, hp, *, grad_scale=None, max_grad_norm=None):
    """Expected params, grads and state after one native step of one bucket, and the sums on the way: ``tensors``:
    per param a dict of its param, grad and state tensors (copies); ``hp``: the param group's hyperparameters.
    Returns (per-tensor results, sums) with sums: ``grad`` (the bucket's Σg², max_grad_norm), ``partials`` (pass 1's
    [2, n_blocks]) and ``norms`` (their segment sums [2, n_tensors]), each as the engines compute them."""
    lr, (beta1, beta2) = float(hp["lr"]), hp["betas"]
    w, b2, omb2 = _f32(1 - beta1), _f32(beta2), _f32(1 - beta2)
    eps, wd = _f32(hp["eps"]), _f32(hp["weight_decay"])
    c, sums = None, {}
    if max_grad_norm is not None:  # the grad pass and one segment over every block of the bucket
        parts = []
        for x in tensors:
            g = x["grad"].float()
            g = g / grad_scale if grad_scale is not None else g
            parts += block_partials(_sq(g))
        sums["grad"] = segment_total(parts)
        c = _f32(float(clip_coefficient(max_grad_norm, sums["grad"])))
    out = []
    for x in tensors:
        step = float(x["step"]) + 1.0
        g = x["grad"].float()
        if grad_scale is not None:
            g = g / grad_scale
        grad_out = g.to(x["grad"].dtype)
        if c is not None:
            g = g * c
        m, v = x["exp_avg"], x["exp_avg_sq"]
        diff = g - m
        m = _fma(w, diff, m) if float(w) < 0.5 else _fma(-diff, 1.0 - w, g)
        v = _fma(omb2 * g, g, v * b2)
        bc1 = _f32(1 - beta1 ** step) if hp["bias_correction"] else _f32(1.0)
        bc2 = _f32(1 - beta2 ** step) if hp["bias_correction"] else _f32(1.0)
        theta = (x["master_param"] if "master_param" in x else x["param"]).float()
        u = (m / bc1) / (_sqrt_rn(v / bc2) + eps)
        if float(wd) != 0.0:
            u = _fma(wd, theta, u)
        out.append(dict(theta=theta, u=u, m=m, v=v, grad=grad_out, step=step))
    partials, norms = [[], []], [[], []]
    for x, e in zip(tensors, out):
        r = 1.0
        if hp["layer_adaptation"]:  # pass 1's float64 partials, segment_sum per tensor, the ratio in fp64
            for q, value in enumerate((e["theta"], e["u"])):
                partials[q].append(block_partials(_sq(value)))
                norms[q].append(segment_total(partials[q][-1]))
            w_norm, u_norm = math.sqrt(float(norms[0][-1])), math.sqrt(float(norms[1][-1]))
            r = w_norm / u_norm if w_norm > 0.0 and u_norm > 0.0 else 1.0
            if hp["trust_clip"] is not None and not math.isnan(r):  # NaN (inf / inf) stays NaN
                r = min(max(r, hp["trust_clip"][0]), hp["trust_clip"][1])
        theta = _fma(_f32(-(lr * r)), e["u"], e["theta"])
        e.update(param=theta.to(x["param"].dtype), exp_avg=e["m"], exp_avg_sq=e["v"], step=torch.tensor(e["step"]))
        if "master_param" in x:
            e["master_param"] = theta
    if hp["layer_adaptation"]:
        sums["partials"] = torch.stack([torch.stack([b for t in partials[q] for b in t]) for q in range(2)])
        sums["norms"] = torch.stack([torch.stack(norms[q]) for q in range(2)])
    return out, sums


REPLAY = [
    # (param dtype, master, FusedLAMB options, GradScaler scale)
    (torch.float32, False, dict(weight_decay=0.01), None),
    (torch.bfloat16, True, dict(weight_decay=0.1, trust_clip=(0.0, 0.8), max_grad_norm=0.5), 1024.0),
    (torch.float16, False, dict(weight_decay=0.0, bias_correction=False, betas=(0.3, 0.5), trust_clip=(2.0, math.inf)),
     None),
    (torch.float32, False, dict(weight_decay=0.1, layer_adaptation=False, max_grad_norm=1e3), 256.0),  # one pass
    (torch.bfloat16, False, dict(weight_decay=0.01, eps=1e-8, max_grad_norm=2.0), None),
]


def _replay_one_step(dtype, master, options, scale, monkeypatch, edit=None):
    """From a mid-training state (per-tensor steps, random moments and master weights; then ``edit(params, opt)``
    if given), one native step against the operation-by-operation replay ``_lamb_ops``: the sums on the way and
    every param, master weight, moment, unscaled grad and step, bit for bit (a NaN where the replay has a NaN).
    Returns the params."""
    seen = []  # (partials, seg_start, out) of every segment_sum of the step
    real_segment_sum = native.segment_sum

    def recording(partials, seg_start):
        out = real_segment_sum(partials, seg_start)
        seen.append((partials.clone(), out.clone()))
        return out
    monkeypatch.setattr(native, "segment_sum", recording)
    gen = torch.Generator().manual_seed(len(options))
    shapes = [(4096 * 2 + 5,), (300,), (), (0,), (17, 33)]
    ps = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    opt = FusedLAMB(ps, lr=3e-2, backend="native", master_weights=master, **options)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state; now give it values of a later step
    for i, p in enumerate(ps):
        st = opt.state[p]
        st["step"].fill_(4.0 + i)
        st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 0.1)
        st["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 1e-2)
        if "master_param" in st:
            st["master_param"].copy_(torch.randn(p.shape, generator=gen))
        p.grad = (torch.randn(p.shape, generator=gen) * (scale or 1.0)).to(dtype)
    if edit is not None:
        edit(ps, opt)
    tensors = [dict(param=p.detach().clone(), grad=p.grad.clone(),
                    **{k: v.clone() for k, v in opt.state[p].items()}) for p in ps]
    expected, sums = _lamb_ops(tensors, opt.param_groups[0], grad_scale=None if scale is None else _f32(scale),
                               max_grad_norm=options.get("max_grad_norm"))
    if scale is not None:
        opt.grad_scale, opt.found_inf = _f32(scale), _f32(0.0)
    seen.clear()
    opt.step()
    for i, (p, exp) in enumerate(zip(ps, expected)):
        got = dict(param=p.detach(), grad=p.grad, **opt.state[p])
        for key in got:
            a, b = got[key].reshape(-1).float(), exp[key].reshape(-1).float()
            bad = ((a != b) & ~(a.isnan() & b.isnan())).sum().item()
            assert bad == 0, f"tensor {i} {key}: {bad} of {exp[key].numel()} elements differ from the op order"
    want = ([("grad", (None, sums["grad"].reshape(1, 1)))] if "grad" in sums else []) + \
        ([("norms", (sums["partials"], sums["norms"]))] if "norms" in sums else [])
    assert len(seen) == len(want), "one segment_sum per reduction of the step"
    for (what, (want_partials, want_out)), (got_partials, got_out) in zip(want, seen):
        assert got_out.dtype == torch.float64, f"{what}: the sums of squares are float64"
        if want_partials is not None:
            assert torch.equal(got_partials, want_partials), f"{what}: pass 1's per-block partials"
        assert torch.equal(got_out, want_out), f"{what}: segment sums"
    return ps


@pytest.mark.parametrize("dtype,master,options,scale", REPLAY, ids=[f"v{i}" for i in range(len(REPLAY))])
def test_one_step_is_the_documented_op_order_bit_for_bit(dtype, master, options, scale, monkeypatch):
    """From a mid-training state (per-tensor steps, random moments and master weights), one native step equals the
    operation-by-operation replay of csrc/lamb_rule.h, each operation one fp32 rounding, the FMAs where the Triton
    rule has tl.fma: params, master weights, moments, unscaled grads and steps, every bit. The sums on the way (the
    global Σg², pass 1's per-block partials of θ² and u², their per-tensor sums) are the engine's summation order
    of csrc/engine.h in float64 (squares of the widened fp32 values), bit for bit too: a one-ulp change of a sum
    moves r by ~1e-16 relative, which -(γ r) rounded to fp32 almost always absorbs, so they are compared
    themselves."""
    _replay_one_step(dtype, master, options, scale, monkeypatch)


def _huge_grad_tiny_params_and_direction(ps, opt):
    """Tensor 0: one grad of 1e20 (g² = 1e40 overflows fp32), so c ~ 1e-20 scales every grad; tensor 1: params of
    ~1e-24 (θ² ~ 1e-48 vanishes in fp32; weight_decay = 0, so u does not depend on θ); tensor 4: zero moments and
    grads of ~1e-10, clipped to ~1e-30: u ~ 1e-25, u² vanishes in fp32."""
    with torch.no_grad():
        ps[0].grad[3] = 1e20
        ps[1].mul_(1e-24)
        ps[4].grad.mul_(1e-10)
        opt.state[ps[4]]["exp_avg"].zero_()
        opt.state[ps[4]]["exp_avg_sq"].zero_()


def _inf_param(ps, opt):
    """Tensor 1 holds an inf: ‖θ‖ = ‖u‖ = inf (u = a + λ θ), r = inf / inf = NaN."""
    with torch.no_grad():
        ps[1][5] = math.inf


EXTREME = [
    # (FusedLAMB options, edit): fp32 params, no GradScaler
    (dict(weight_decay=0.0, max_grad_norm=1.0), _huge_grad_tiny_params_and_direction),
    (dict(weight_decay=0.01, trust_clip=(0.0, 10.0)), _inf_param),
]


@pytest.mark.parametrize("options,edit", EXTREME, ids=["fp32-squares-overflow-underflow", "nan-ratio-trust-clip"])
def test_extreme_magnitudes_are_the_documented_op_order_bit_for_bit(options, edit, monkeypatch):
    """The replay where fp32 squares would overflow or vanish, and where the trust ratio is NaN: the float64 sums
    of squares keep Σg² finite (c ~ 1e-20, not 0), ‖θ‖ and ‖u‖ of ~1e-24 non-zero (r = ‖θ‖ / ‖u‖, not 1), and a NaN
    ratio stays NaN through the trust clip (the whole tensor NaN, not clamped to the clip's low end)."""
    ps = _replay_one_step(torch.float32, False, options, None, monkeypatch, edit)
    if edit is _inf_param:  # the NaN stays in its tensor
        assert ps[1].isnan().all() and all(p.isfinite().all() for i, p in enumerate(ps) if i != 1)


# ----------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------
def _run(dtype, master, steps=3):
    """Params and state after native LAMB steps: two groups (adapted with a trust clip, and one fused pass), the
    global clip active, tensors of many blocks (so several threads share each tensor's partials)."""
    g = torch.Generator().manual_seed(11)
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_()
          for s in [(70000,), (40000,), (333,), (), (0,), (4096,)]]
    opt = FusedLAMB([dict(params=ps[:3], trust_clip=(0.0, 5.0)), dict(params=ps[3:], layer_adaptation=False)],
                    lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, backend="native", master_weights=master)
    for k in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 3).to(dtype)
        opt.step()
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_bitwise_deterministic_across_runs_threads_and_isas(dtype, master, monkeypatch):
    """Same inputs, same bits: twice, with 1 thread instead of all, and with the baseline-ISA build of the CPU loops
    instead of the AVX2+FMA one: the per-block sums add lane by lane, whatever the vector width or the thread that
    runs the block, and the per-tensor sums in one fixed order."""
    first = _run(dtype, master)
    _bitwise_equal(first, _run(dtype, master))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _bitwise_equal(first, _run(dtype, master))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("FUSED_OPTIM_CPU_ISA", "baseline")
    assert "cpu: baseline," in torch.ops.fused_optim.build_info()
    _bitwise_equal(first, _run(dtype, master))


# ----------------------------------------------------------------------------------------------------------------
# segment_sum and the grad pass
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_segment_sum_is_the_documented_order(index_dtype):
    """Segments of 0, 1, 3, 1,024, 1,025 and 5,000 partials (mixed signs and magnitudes), two quantities: each sum
    is the 1,024-lane order of csrc/engine.h, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    lengths = [0, 1, 3, 1024, 1025, 5000, 0, 7]
    n = sum(lengths)
    partials = (torch.randn(2, n, generator=gen, dtype=torch.float64)
                * torch.exp2(torch.randint(-20, 20, (2, n), generator=gen).double()))
    seg = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(index_dtype)
    out = native.segment_sum(partials, seg)
    assert out.shape == (2, len(lengths)) and out.dtype == torch.float64
    for q in range(2):
        for s, (lo, hi) in enumerate(zip(seg[:-1].tolist(), seg[1:].tolist())):
            want = segment_total(list(partials[q, lo:hi])) if hi > lo else torch.tensor(0.0, dtype=torch.float64)
            assert torch.equal(out[q, s], want), (q, s, hi - lo)
    assert torch.equal(native.segment_sum(partials[0].contiguous(), seg), out[:1])  # 1-D partials: one quantity


def test_grad_sq_norm_is_the_documented_order():
    """The global Σg² of a bucket: float64 squares in the per-block order of the CPU engine, then one segment over
    every block."""
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(4096 * 3 + 1,), (5,), (0,), ()]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 100
    opt = FusedLAMB(ps, backend="native", max_grad_norm=1.0)
    opt.step()
    bucket, = opt._collect()
    bucket.states = [opt.state[p] for p in bucket.params]
    scale = torch.tensor(64.0)
    got = backends.grad_sq_norm(bucket, "lamb", tables=opt._tables, grad_scale=scale)
    want = segment_total([b for p in ps for b in block_partials(_sq(p.grad / scale))])
    assert got.dtype == torch.float64 and got.dim() == 0 and torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------------
# The ops' own checks (what fused_optim.native.lamb normally gets right)
# ----------------------------------------------------------------------------------------------------------------
# Positions in the argument list of fused_optim::lamb_ (schema: csrc/ops_lamb.cpp).
PARAMS, MASTERS, PHASE, TRUST_CLIP, CLIP_LO, CLIP_HI, GRAD_CLIP, PARTIALS, SUMS = 0, 4, 12, 20, 21, 22, 23, 24, 25


def _lamb_op_args(params):
    """A valid argument list of one pass 1 (phase 0) over ``params``, and its table."""
    states = [dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=torch.tensor(0.0))
              for p in params]
    grads = [torch.ones_like(p) for p in params]
    operands = dict(param=params, grad=grads, exp_avg=[s["exp_avg"] for s in states],
                    exp_avg_sq=[s["exp_avg_sq"] for s in states], master_param=[None] * len(params),
                    step=[s["step"] for s in states])
    table = TensorTable.build(operands, CPU)
    return [params, grads, operands["exp_avg"], operands["exp_avg_sq"], [], operands["step"],
            [table.ptrs[n] for n in native.LAMB_OPERANDS], table.numels, table.block_tensor, table.block_start,
            table.arrivals, table.block, native.LAMB_NORMS, 1e-3, None, 0.9, 0.999, 1e-6, 0.01, True, False, 0.0,
            0.0, None, torch.empty(2, table.n_blocks, dtype=torch.float64), None, None, None], table


def _with(args, changes: dict) -> list:
    out = list(args)
    for position, value in changes.items():
        out[position] = value
    return out


def test_op_checks_its_arguments():
    op = torch.ops.fused_optim.lamb_
    ps = [torch.randn(5), torch.randn(4100)]
    args, table = _lamb_op_args(ps)
    op(*args)
    op(*_with(args, {PHASE: native.LAMB_APPLY, PARTIALS: None, SUMS: torch.ones(2, 2, dtype=torch.float64)}))
    with pytest.raises(RuntimeError, match="fused_optim::lamb_: phase must be"):
        op(*_with(args, {PHASE: 7}))
    with pytest.raises(RuntimeError, match="partials is required by pass 1"):
        op(*_with(args, {PARTIALS: None}))
    with pytest.raises(RuntimeError, match=r"partials must be a contiguous float64 tensor of \[2, n_blocks\] = 6"):
        op(*_with(args, {PARTIALS: torch.empty(2, 2, dtype=torch.float64)}))
    with pytest.raises(RuntimeError, match=r"partials must be a contiguous float64 tensor of \[2, n_blocks\] = 6"):
        op(*_with(args, {PARTIALS: torch.empty(2, 3)}))  # float32: the sums of squares are float64
    with pytest.raises(RuntimeError, match="sums is required by pass 2"):
        op(*_with(args, {PHASE: native.LAMB_APPLY, PARTIALS: None}))
    with pytest.raises(RuntimeError, match=r"sums must be a contiguous float64 tensor of \[2, n_tensors\] = 4"):
        op(*_with(args, {PHASE: native.LAMB_APPLY, PARTIALS: None, SUMS: torch.ones(2, 3, dtype=torch.float64)}))
    with pytest.raises(RuntimeError, match=r"sums must be a contiguous float64 tensor of \[2, n_tensors\] = 4"):
        op(*_with(args, {PHASE: native.LAMB_APPLY, PARTIALS: None, SUMS: torch.ones(2, 2)}))  # float32
    with pytest.raises(RuntimeError, match="sums is only read by pass 2"):
        op(*_with(args, {PHASE: native.LAMB_FUSED, PARTIALS: None, SUMS: torch.ones(2, 2, dtype=torch.float64)}))
    stale, _ = _lamb_op_args([torch.randn(5), torch.randn(4100)])
    stale[6:12] = args[6:12]  # another param set's tensors with this table
    with pytest.raises(RuntimeError, match="fused_optim::lamb_: the param table does not hold the address of param 0"):
        op(*stale)
    with pytest.raises(RuntimeError, match=r"fused_optim::lamb_: params\[0\] has dtype Double"):
        op(*_with(args, {PARAMS: [p.double() for p in ps]}))
    with pytest.raises(RuntimeError, match="fused_optim::lamb_: master_params were given for float32 params"):
        op(*_with(args, {MASTERS: [torch.zeros(5), torch.zeros(4100)]}))
    with pytest.raises(RuntimeError, match="trust_clip needs 0 <= clip_lo <= clip_hi"):
        op(*_with(args, {TRUST_CLIP: True, CLIP_LO: 2.0, CLIP_HI: 1.0}))
    with pytest.raises(RuntimeError, match="grad_clip must be a 1-element float32 or float64 tensor"):
        op(*_with(args, {GRAD_CLIP: torch.ones(2)}))


def test_segment_sum_checks_its_arguments():
    ones = torch.ones(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fused_optim::segment_sum: seg_start.*out of order or out of range"):
        native.segment_sum(ones, torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seg_start.*out of order or out of range"):
        native.segment_sum(ones, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="partials must be a contiguous float64 tensor"):
        native.segment_sum(torch.ones(4), torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="seg_start must be a contiguous int32 or int64 vector"):
        native.segment_sum(ones, torch.tensor([0.0, 4.0]))


def test_op_schemas_declare_mutation():
    def mutated(op):
        return {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated(torch.ops.fused_optim.lamb_) == {"params", "grads", "exp_avgs", "exp_avg_sqs", "master_params",
                                                    "steps", "arrivals", "partials"}
    assert mutated(torch.ops.fused_optim.grad_sq_) == {"arrivals", "partials"}
    assert mutated(torch.ops.fused_optim.segment_sum) == set()


def test_auto_picks_native_for_lamb_on_cpu():
    p = torch.nn.Parameter(torch.randn(10))
    opt = FusedLAMB([p])
    p.grad = torch.randn(10)
    launches = native.LAUNCHES["count"]
    opt.step()
    assert native.LAUNCHES["count"] - launches == 3
    assert fused_optim.backends.resolve("auto", CPU, torch.bfloat16, "x", rule="lamb") == "native"
