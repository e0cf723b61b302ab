"""The native backend beyond the shared parity table (tests/test_parity.py, test_edge_cases.py, test_interop.py and
test_gpu.py run it like every fused backend): one launch for 1,500 tensors, bitwise determinism across runs,
threads and CPU ISAs, the exact rounding of bf16/fp16 stores, GradScaler's unscale and skip, an fp64 lr tensor,
the op's own argument checks, and the fallback when the extension is missing.

Runs on CPU tensors (the CPU engine runs the same rule as the CUDA kernels); the ``gpu`` test runs on the GPU
machine. The build itself (AOT, JIT, nvcc compile check) is tested in test_native_build.py.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import fused_optim
from fused_optim import backends, native
from fused_optim.tables import TensorTable
from tolerances import assert_close_atol, assert_within_ulps, param_ulps, state_atol, theta_atol

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(backends.unusable("native", CPU) is not None,
                                reason=f"native backend unusable: {backends.unusable('native', CPU)}")

# Sizes around the 4096-element block (a full block, one more, a tail), empty, 0-d and odd ones.
AWKWARD = [(), (0,), (1,), (3,), (4095,), (4096,), (4097,), (8193,), (3, 0), (17, 33)]


def _pair(make, cls=fused_optim.FusedAdamW, **kw):
    a, b = make(), make()
    return a, b, cls(a, backend="native", **kw), cls(b, backend="reference", **kw)


def _grads(params, seed, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(dtype or p.dtype) for p in params]


def _step(pairs, grads):
    for params, opt in pairs:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()


def _assert_parity(a, b, oa, ob, lrs, dtype, master, l2=0.0):
    """Params and state within the bounds of tests/tolerances.py; `l2`: Adam's (coupled) weight decay, which feeds
    the param's difference back into the moments (as in test_parity.assert_parity)."""
    for i, (pa, pb) in enumerate(zip(a, b)):
        sa, sb = oa.state[pa], ob.state[pb]
        assert float(sa["step"]) == float(sb["step"]) == len(lrs), f"param {i} step"
        if pb.numel() == 0:
            continue
        d_theta = theta_atol(lrs, pb.abs().max().item())
        if dtype == torch.float32:
            assert_close_atol(pa.detach(), pb.detach(), d_theta, f"param {i}")
        else:
            assert_within_ulps(pa.detach(), pb.detach(), param_ulps(dtype, master), f"param {i}")
        if master:
            mp = sb["master_param"]
            d_theta = theta_atol(lrs, mp.abs().max().item())
            assert_close_atol(sa["master_param"], mp, d_theta, f"master {i}")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in sb:
                tol = state_atol(len(lrs), sb[key].abs().max().item()) + len(lrs) * l2 * d_theta
                assert_close_atol(sa[key], sb[key], tol, f"{key} {i}")


def test_1500_tensors_one_launch_per_step(monkeypatch):
    """1,500 bf16 tensors with fp32 master weights and amsgrad, awkward sizes and odd-offset views, in one launch."""
    calls = []
    launcher = native.RULES["adam"]

    def counting(*args, **kwargs):
        calls.append(1)
        return launcher(*args, **kwargs)
    counting.OPERANDS = launcher.OPERANDS
    monkeypatch.setitem(native.RULES, "adam", counting)

    def make():
        g = torch.Generator().manual_seed(1)
        shapes = [AWKWARD[i % len(AWKWARD)] if i % 7 == 0 else (1 + (i * 37) % 300,) for i in range(1490)]
        ps = [torch.randn(s, generator=g).to(torch.bfloat16).requires_grad_() for s in shapes]
        buf = torch.randn(30000, generator=g).to(torch.bfloat16)
        ps += [torch.nn.Parameter(buf[o:o + n]) for o, n in ((1, 4099), (4101, 7), (4109, 9000), (13111, 5),
                                                             (13117, 4096), (17215, 3), (17219, 1), (17221, 12000),
                                                             (29223, 0), (29225, 700))]
        return ps
    a, b, oa, ob = _pair(make, lr=1e-2, amsgrad=True, weight_decay=0.1, master_weights=True)
    assert len(a) == 1500
    for k in range(3):
        _step([(a, oa), (b, ob)], _grads(a, k))
    assert len(calls) == 3, "one launch per step for 1,500 tensors"
    _assert_parity(a, b, oa, ob, [1e-2] * 3, torch.bfloat16, master=True)


def test_launch_of_only_empty_tensors_advances_steps():
    a = [torch.zeros(0).requires_grad_(), torch.zeros(2, 0).requires_grad_()]
    opt = fused_optim.FusedAdam(a, backend="native")
    for _ in range(3):
        _step([(a, opt)], _grads(a, 0))
    assert [float(opt.state[p]["step"]) for p in a] == [3.0, 3.0]


def _run(dtype, master, steps=4, seed=0):
    """Params and state after `steps` native steps of Adam (L2: the FMA-sensitive path) + amsgrad."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(70000,), (40000,), (333,), (), (0,)]]
    opt = fused_optim.FusedAdam(ps, lr=1e-2, weight_decay=0.3, amsgrad=True, backend="native", master_weights=master)
    for k in range(steps):
        _step([(ps, opt)], _grads(ps, 100 + k))
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]


def _bitwise_equal(xs, ys):
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), i


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_bitwise_deterministic_across_runs_threads_and_isas(dtype, master, monkeypatch):
    """Same inputs, same bits: twice, with 1 thread instead of all, and with the baseline-ISA build of the CPU loops
    (libm fmaf) instead of the AVX2+FMA one (every operation is one IEEE rounding in both)."""
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
# The op order, bit for bit. The parity tests bound the difference to the reference by a few ulps per step (torch's
# own CPU sqrt is not correctly rounded), which a missing FMA or a reordered operation would pass. Here each
# operation of csrc/adam_rule.h is replayed with one correctly rounded fp32 result each, and one native step must
# match it exactly, for every variant flag and dtype.
# ----------------------------------------------------------------------------------------------------------------
def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _fma(a, b, c):
    """fp32 a * b + c with one rounding: a * b is exact in fp64, p + c = s + e exactly (TwoSum), and rounding s to
    fp32 is wrong only when s is exactly halfway between two fp32 numbers and e pushes the true value across."""
    a, b, c = (t.double() for t in torch.broadcast_tensors(a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    r = s.float()
    other = torch.nextafter(r, torch.where(s > r.double(), torch.tensor(float("inf")), torch.tensor(float("-inf"))))
    tie = (s - r.double()).abs() * 2 == (other.double() - r.double()).abs()
    return torch.where(tie & (e != 0) & (torch.sign(e) == torch.sign(s - r.double())), other, r)


def _adam_ops(param, grad, m, v, vmax, master, step, *, lr, beta1, beta2, eps, wd, maximize, decoupled,
              grad_scale):
    """One Adam step on fp32 copies, operation by operation as csrc/adam_rule.h (and kernels/adam.py) do it."""
    step = float(step) + 1.0
    c = dict(step_size=_f32(lr / (1 - beta1 ** step)), bc2_sqrt=_f32(math.sqrt(1 - beta2 ** step)),
             decay=_f32(1 - lr * wd), wd=_f32(wd), w=_f32(1 - beta1), beta2=_f32(beta2), omb2=_f32(1 - beta2),
             eps=_f32(eps))
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    g_out = g
    if maximize:
        g = -g
    theta = (master if master is not None else param).float()
    if float(c["wd"]) != 0.0:
        theta, g = (theta * c["decay"], g) if decoupled else (theta, _fma(c["wd"], theta, g))
    diff = g - m
    m = _fma(c["w"], diff, m) if float(c["w"]) < 0.5 else _fma(-diff, 1.0 - c["w"], g)
    v = _fma(c["omb2"] * g, g, v * c["beta2"])
    v_hat = v if vmax is None else torch.maximum(vmax, v)
    denom = v_hat.double().sqrt().float() / c["bc2_sqrt"] + c["eps"]  # fp64 sqrt rounded to fp32: correctly rounded
    theta = theta + (-c["step_size"] * m) / denom
    return dict(param=theta.to(param.dtype), grad=g_out.to(grad.dtype), exp_avg=m, exp_avg_sq=v,
                max_exp_avg_sq=None if vmax is None else v_hat, master_param=None if master is None else theta,
                step=torch.tensor(step))


VARIANTS = [
    dict(cls="FusedAdam", weight_decay=0.1),  # L2: the FMA of g + wd * theta
    dict(cls="FusedAdam", weight_decay=0.1, amsgrad=True, maximize=True, betas=(0.3, 0.5)),  # lerp's other branch
    dict(cls="FusedAdamW", weight_decay=0.3, amsgrad=True),
    dict(cls="FusedAdamW", weight_decay=0.0, maximize=True, eps=1e-3),
    dict(cls="FusedAdamW", weight_decay=0.01, scale=1024.0),  # GradScaler unscale
]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                          (torch.float16, True)])
@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=lambda i: f"v{i}")
def test_one_step_is_the_documented_op_order_bit_for_bit(dtype, master, variant):
    kw = dict(VARIANTS[variant])
    cls, scale = getattr(fused_optim, kw.pop("cls")), kw.pop("scale", None)
    gen = torch.Generator().manual_seed(variant)
    ps = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in [(4097,), (300,), ()]]
    opt = cls(ps, lr=3e-2, backend="native", master_weights=master, **kw)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state; now give it values of a later step
    for i, p in enumerate(ps):
        st = opt.state[p]
        st["step"].fill_(4.0 + i)
        st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 0.1)
        st["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 1e-2)
        if "max_exp_avg_sq" in st:
            st["max_exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 1e-2)
        if "master_param" in st:
            st["master_param"].copy_(torch.randn(p.shape, generator=gen))
        g = torch.randn(p.shape, generator=gen)
        wd = kw.get("weight_decay", 0.0)
        theta = st.get("master_param", p.detach().float())
        near = torch.rand(p.shape, generator=gen) < 0.3  # g ~ -wd theta: the L2 sum cancels
        g = torch.where(near, -wd * theta * (1 + 1e-6 * torch.randn(p.shape, generator=gen)), g)
        p.grad = (g * (scale or 1.0)).to(dtype)
    expected = []
    for p in ps:
        st = opt.state[p]
        beta1, beta2 = kw.get("betas", (0.9, 0.999))
        expected.append(_adam_ops(
            p.detach().clone(), p.grad.clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
            st["max_exp_avg_sq"].clone() if "max_exp_avg_sq" in st else None,
            st["master_param"].clone() if "master_param" in st else None, st["step"],
            lr=3e-2, beta1=beta1, beta2=beta2, eps=kw.get("eps", 1e-8), wd=kw.get("weight_decay", 0.0),
            maximize=kw.get("maximize", False), decoupled=cls is fused_optim.FusedAdamW,
            grad_scale=None if scale is None else _f32(scale)))
    if scale is not None:
        opt.grad_scale, opt.found_inf = _f32(scale), _f32(0.0)
    opt.step()
    for i, (p, exp) in enumerate(zip(ps, expected)):
        got = dict(param=p.detach(), grad=p.grad, step=opt.state[p]["step"], **{
            k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
            if k in opt.state[p]})
        for key, want in exp.items():
            if want is None:
                continue
            bad = (got[key].view(-1).float() != want.view(-1).float()).sum().item()
            assert bad == 0, f"tensor {i} {key}: {bad} of {want.numel()} elements differ from the op order"


def _special_fp32_values():
    """fp32 values whose bf16/fp16 rounding is delicate: ties (even and odd), just above/below ties, subnormals of
    both formats, the overflow threshold, max, inf, NaN, signed zeros, and a spread of random magnitudes."""
    vals = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, -70000.0, 3.4e38, float("inf"),
            float("-inf"), float("nan"), 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26,
            1.5 * 2.0 ** -24, 2.0 ** -133, 1e-40, -1e-45, 2.0 ** -126, 6.1e-5]
    bits = []
    for base in (0x3F800000, 0x3F810000, 0x38800000, 0x33800000, 0x477FE000, 0x00400000, 0x7F7F0000):
        for low in (0x7FFF, 0x8000, 0x8001, 0x0FFF, 0x1000, 0x1001, 0x3000, 0xFFFF):
            bits += [base | low, (base | low) | 0x80000000]
    special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    rand = torch.randn(4000, generator=torch.Generator().manual_seed(3)) * torch.exp2(
        torch.randint(-40, 40, (4000,), generator=torch.Generator().manual_seed(4)).float())
    return torch.cat([torch.tensor(vals), special, rand])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_fp16_stores_round_to_nearest_even(dtype):
    """With lr = 0 the master weight is unchanged and the param is the master rounded once: bitwise what torch's
    .to(dtype) gives (round to nearest even), subnormals, overflow to inf and NaN included."""
    values = _special_fp32_values()
    p = torch.nn.Parameter(torch.zeros(values.numel(), dtype=dtype))
    opt = fused_optim.FusedAdam([p], lr=0.0, backend="native", master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()  # creates the state
    opt.state[p]["master_param"].copy_(values)  # same storage: the cached table stays valid
    p.grad = torch.ones_like(p)
    opt.step()
    expected = values.to(dtype)
    got = p.detach()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert torch.equal(opt.state[p]["master_param"][~nan], values[~nan]), "lr = 0 leaves the master unchanged"


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_grad_scaler_unscales_in_place_and_skips_on_found_inf(grad_dtype):
    """What GradScaler hands a `_step_supports_amp_scaling` optimizer: found_inf = 1 leaves params, state, grads
    and steps bitwise unchanged; found_inf = 0 writes grad / scale back (one IEEE division, rounded to the grad's
    dtype) and steps like the reference on the unscaled grads. bf16 grads of fp32 params: `param.grad_dtype`."""
    if grad_dtype != torch.float32 and not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype: a grad's dtype must be its param's")

    def make():
        g = torch.Generator().manual_seed(5)
        ps = [torch.randn(s, generator=g).requires_grad_() for s in [(4097,), (5, 7), ()]]
        for p in ps:
            if grad_dtype != torch.float32:
                p.grad_dtype = grad_dtype
        return ps
    a, b, oa, ob = _pair(make, lr=1e-2)
    scale = torch.tensor(1024.0 + 3.0)
    grads = [(gr * 1027.0).to(grad_dtype) for gr in _grads(a, 6, torch.float32)]
    for opt in (oa, ob):
        opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
    _step([(a, oa), (b, ob)], grads)
    for p, gr in zip(a, grads):
        assert torch.equal(p.grad, (gr.float() / scale).to(grad_dtype)), "grad written back unscaled"

    snapshot = [p.detach().clone() for p in a] + [v.clone() for p in a for v in oa.state[p].values()]
    for p, gr in zip(a, grads):
        p.grad = gr.clone()
    oa.found_inf = torch.tensor(1.0)
    oa.step()
    _bitwise_equal(snapshot, [p.detach() for p in a] + [v for p in a for v in oa.state[p].values()])
    for p, gr in zip(a, grads):
        assert torch.equal(p.grad, gr), "a skipped step leaves the grads scaled"
    _assert_parity(a, b, oa, ob, [1e-2], torch.float32, master=False)


@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32])
def test_lr_tensor_is_read_by_the_kernel(lr_dtype):
    """A 0-d lr tensor on the params' device is read in the kernel (fp32 or fp64), changed in place between steps."""
    def make():
        g = torch.Generator().manual_seed(7)
        return [torch.randn(s, generator=g).requires_grad_() for s in [(300,), (4100,)]]
    a, b = make(), make()
    lr = torch.tensor(1e-2, dtype=lr_dtype)
    oa = fused_optim.FusedAdamW(a, lr=lr, backend="native")
    ob = fused_optim.FusedAdamW(b, lr=1e-2, backend="reference")
    lrs = [1e-2, 3e-2, 1e-3]
    for k, value in enumerate(lrs):
        lr.fill_(value)
        ob.param_groups[0]["lr"] = float(lr)  # the value the kernel sees: lr rounded to lr_dtype
        _step([(a, oa), (b, ob)], _grads(a, 20 + k))
    _assert_parity(a, b, oa, ob, lrs, torch.float32, master=False)


def _op_args(params, table=None):
    states = [dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=torch.tensor(0.0))
              for p in params]
    grads = [torch.ones_like(p) for p in params]
    operands = dict(param=params, grad=grads, exp_avg=[s["exp_avg"] for s in states],
                    exp_avg_sq=[s["exp_avg_sq"] for s in states], max_exp_avg_sq=[None] * len(params),
                    master_param=[None] * len(params), step=[s["step"] for s in states])
    table = table or TensorTable.build(operands, CPU)
    return operands, table


def test_op_refuses_a_stale_table():
    """On the CPU the op checks the table against the tensors (cheap, host memory): a table built for other tensors
    is an error naming the operand, not a write to freed memory."""
    ps = [torch.randn(5), torch.randn(6)]
    operands, table = _op_args(ps)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=True)
    native.adam(table, operands, hp)
    other, _ = _op_args([torch.randn(5), torch.randn(6)])
    with pytest.raises(RuntimeError, match="param table does not hold the address of param 0.*stale"):
        native.adam(table, other, hp)
    resized, _ = _op_args([ps[0], torch.randn(7)], table)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has 7 elements but params\[1\]|table does not hold"):
        native.adam(table, resized, hp)


def test_op_refuses_master_weights_for_fp32_params():
    """Master weights are fp32 copies of bf16/fp16 params: given for fp32 params, adam_ refuses them and writes
    nothing."""
    ps = [torch.randn(5), torch.randn(6)]
    operands, _ = _op_args(ps)
    operands["master_param"] = [p.clone() for p in ps]
    table = TensorTable.build(operands, CPU)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=True)
    before = [p.clone() for p in ps]
    with pytest.raises(RuntimeError, match="fused_optim::adam_: master_params were given for float32 params"):
        native.adam(table, operands, hp)
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert all(float(t) == 0 for t in operands["step"])


def test_op_schema_declares_mutation():
    schema = torch.ops.fused_optim.adam_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "steps",
                       "arrivals"}


_HIDE_PREBUILT = """
import importlib.abc, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fused_optim._C":
            raise ModuleNotFoundError("hidden by the test", name=name)
sys.meta_path.insert(0, _Hide())
"""


def run_without_prebuilt(code: str, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `import fused_optim._C` fails as if it had not been built."""
    return subprocess.run([sys.executable, "-c", _HIDE_PREBUILT + code], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_without_the_extension_native_errors_and_auto_falls_back_with_one_warning():
    proc = run_without_prebuilt("""
import warnings, torch, fused_optim
from fused_optim import backends
why = backends.native_unusable(torch.device("cpu"))
assert why and "fused_optim._C is not built" in why and "FUSED_OPTIM_NO_JIT=1" in why, why
p = [torch.nn.Parameter(torch.ones(3))]
try:
    fused_optim.FusedAdamW(p, backend="native")
    raise SystemExit("backend='native' did not raise")
except fused_optim.BackendUnavailable as exc:
    assert "param 0 of param group 0" in str(exc) and "not built" in str(exc), exc
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt = fused_optim.FusedAdamW(p, backend="auto")
    for _ in range(3):
        p[0].grad = torch.ones(3)
        opt.step()
msgs = [str(w.message) for w in caught if "fused_optim" in str(w.message)]
assert len(msgs) == 1 and "reference path on cpu" in msgs[0] and "not built" in msgs[0], msgs
assert float(opt.state[p[0]]["step"]) == 3
print("fallback ok")
""", FUSED_OPTIM_NO_JIT="1")
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stdout + proc.stderr


def test_jit_without_a_compiler_reports_why():
    proc = run_without_prebuilt("""
import torch
from fused_optim import native
try:
    native.load()
    raise SystemExit("load() did not raise")
except native.NativeUnavailable as exc:
    print(exc)
""", CXX="/nonexistent/c++")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not built" in proc.stdout and "no C++ compiler" in proc.stdout and "/nonexistent/c++" in proc.stdout


@pytest.mark.gpu
def test_cuda_graph_mixed_alignment_and_scaler_skip():
    """CUDA: one launch mixing 16-byte aligned tensors (vector path) and odd-offset views (scalar path), captured
    in a CUDA graph with GradScaler's found_inf read on the device: replays that skip leave everything unchanged,
    the others match eager native steps bitwise, and eager matches the reference."""
    dev = torch.device("cuda")

    def make():
        g = torch.Generator().manual_seed(9)
        buf = torch.randn(20000, generator=g)
        ps = [torch.randn(s, generator=g).requires_grad_() for s in [(4097,), (), (0,), (33, 65)]]
        ps += [torch.nn.Parameter(buf[1:4100].clone()), torch.nn.Parameter(buf[:9001].clone())]
        ps = [torch.nn.Parameter(p.detach().to(dev)) for p in ps]
        flat = torch.randn(12000, generator=g).to(dev)  # seeded: the three copies must start equal
        return ps + [torch.nn.Parameter(flat[3:4103]), torch.nn.Parameter(flat[4105:11000])]
    pg, pe, pr = make(), make(), make()
    og = fused_optim.FusedAdam(pg, lr=torch.tensor(1e-2, device=dev), weight_decay=0.1, backend="native")
    # The captured step reads lr from an fp32 tensor: the eager steps get the same fp32 value as a float.
    lr = float(og.param_groups[0]["lr"])
    oe = fused_optim.FusedAdam(pe, lr=lr, weight_decay=0.1, backend="native")
    orf = fused_optim.FusedAdam(pr, lr=lr, weight_decay=0.1, backend="reference")
    scale, found = torch.tensor(64.0, device=dev), torch.zeros((), device=dev)
    static = [torch.zeros_like(p) for p in pg]
    for p, s in zip(pg, static):
        p.grad = s
    og.grad_scale, og.found_inf = scale, found

    def grads(k):
        g = torch.Generator(device=dev).manual_seed(k)
        return [torch.randn(p.shape, device=dev, generator=g) * 64.0 for p in pg]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s, gr in zip(static, grads(0)):
            s.copy_(gr)
        og.step()  # warm-up: state and tables are created outside the capture
    torch.cuda.current_stream().wait_stream(side)
    for opt, ps in ((oe, pe), (orf, pr)):
        for p, gr in zip(ps, grads(0)):
            p.grad = gr / 64.0
        opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    steps = 1
    for k in range(1, 7):
        skip = k in (2, 5)
        found.fill_(1.0 if skip else 0.0)
        for s, gr in zip(static, grads(k)):
            s.copy_(gr)
        before = [p.detach().clone() for p in pg]
        graph.replay()
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, pg)), "a skipped replay changed a param"
            continue
        steps += 1
        for opt, ps in ((oe, pe), (orf, pr)):
            for p, gr in zip(ps, grads(k)):
                p.grad = gr / 64.0
            opt.step()
    torch.cuda.synchronize()
    for a, b in zip(pg, pe):
        assert torch.equal(a, b), "graph replay and eager native are the same kernel on the same inputs"
    _assert_parity(pe, pr, oe, orf, [1e-2] * steps, torch.float32, master=False, l2=0.1)
    assert all(float(og.state[p]["step"]) == steps for p in pg)


# ================================================================================================================
# Adafactor on the native engines (csrc/adafactor_rule.h, cpu/tile_map_cpu.h). Parity with the reference, the
# option variants, GradScaler, launches per step and reruns are tests/test_adafactor.py's (it runs every usable
# backend); here: the op order bit for bit, determinism across threads and ISAs, the operators' schemas and checks.
# ================================================================================================================
def _adafactor_ops(theta, g, state, *, t, lr, eps1, eps2, decay_rate, beta1, wd, relative_step,
                   warmup_init, scale_parameter, clip_threshold):
    """One Adafactor step on fp32 copies, operation by operation as csrc/adafactor_rule.h does it (and
    kernels/adafactor.py), from grads and params whose sums of squares are exact in any order (the test makes them
    so) except ΣR_t, which is replayed in the CPU engine's order (each matrix's rows added in sequence). Returns the
    new theta and states."""
    beta2 = 1.0 - t ** decay_rate
    b2, omb2 = _f32(beta2), _f32(1.0 - beta2)
    e1 = _f32(eps1)
    sq = g * g + e1
    rsqrt = lambda x: 1.0 / x.double().sqrt().float()  # noqa: E731  (fp64 sqrt rounded once: correctly rounded)
    out = {}
    if "exp_avg_sq_row" in state:
        n, m = g.shape[-2], g.shape[-1]
        R = _fma(omb2, sq.sum(-1) / m, state["exp_avg_sq_row"] * b2)
        C = _fma(omb2, sq.sum(-2) / n, state["exp_avg_sq_col"] * b2)
        total = torch.zeros(R.shape[:-1])
        for r in range(n):  # the CPU engine's segment sum: each matrix's rows in order
            total = total + R[..., r]
        mean_r = total / n
        U = (rsqrt(R / mean_r.unsqueeze(-1)).unsqueeze(-1) * rsqrt(C).unsqueeze(-2)) * g
        out.update(exp_avg_sq_row=R, exp_avg_sq_col=C)
    else:
        V = _fma(omb2, sq, state["exp_avg_sq"] * b2)
        U = rsqrt(V) * g
        out.update(exp_avg_sq=V)
    rho = (min(1e-6 * t if warmup_init else 1e-2, 1.0 / math.sqrt(t)) if relative_step else lr)
    theta_sq = theta.double().square().sum().item()  # exact: the test's params are multiples of 1/16
    alpha = rho * max(eps2, math.sqrt(theta_sq / theta.numel())) if scale_parameter else rho
    rms_u = math.sqrt(U.double().square().sum().item() / theta.numel())
    assert rms_u / clip_threshold < 0.5, "the test keeps clipping off: ΣU² is not an exact sum"
    update = U * _f32(alpha)
    if beta1 is not None:
        update = _fma(_f32(1.0 - beta1), update, state["exp_avg"] * _f32(beta1))
        out["exp_avg"] = update
    decay = _f32(-wd * alpha)
    if float(decay) != 0.0:
        theta = _fma(decay, theta, theta)
    out["theta"] = theta - update
    return out


ADAFACTOR_VARIANTS = [
    dict(),
    dict(beta1=0.9, weight_decay=0.1, warmup_init=True),
    # ε1 = 2^-10: g² + ε1 is exact for the test's grads (multiples of 1/8), so its row and column sums are too
    dict(relative_step=False, lr=0.02, scale_parameter=False, beta1=0.3, weight_decay=0.05, eps=(2.0 ** -10, 1e-2)),
    dict(decay_rate=-0.5, eps=(0.0, 1e-3), scale=256.0),  # GradScaler unscale (a power of two: exact)
]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("variant", range(len(ADAFACTOR_VARIANTS)), ids=lambda i: f"v{i}")
def test_adafactor_one_step_is_the_documented_op_order_bit_for_bit(dtype, master, variant):
    """Every element operation of one native Adafactor step, replayed with one rounding each, is bitwise what the
    engine stores (params, master weights, every state, step), for matrices crossing tiles both ways, batches,
    1 x n, n x 1 and flat tensors, after a few steps of state. The sums are made exact in any order (params are
    multiples of 1/16, grads of 1/8, clipping is off), except ΣR_t, replayed in the CPU engine's order."""
    kw = dict(ADAFACTOR_VARIANTS[variant])
    scale = kw.pop("scale", None)
    kw.setdefault("clip_threshold", 1e6)
    gen = torch.Generator().manual_seed(variant)
    shapes = [(37, 300), (2, 5, 7), (1, 9), (9, 1), (4097,), (), (3,)]
    ps = [(torch.randint(-32, 33, s, generator=gen) / 16.0).to(dtype).requires_grad_() for s in shapes]
    opt = fused_optim.FusedAdafactor(ps, backend="native", master_weights=master, **kw)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state; now give it the values of a later step
    for i, p in enumerate(ps):
        st = opt.state[p]
        st["step"].fill_(3.0 + i)
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in st:
                st[key].copy_(torch.rand(st[key].shape, generator=gen) * 1e-2 + 1e-4)
        if "exp_avg" in st:
            st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 1e-3)
        with torch.no_grad():  # the first step's weight decay moved them: multiples of 1/16 again (Σθ² exact)
            p.copy_((torch.randint(-32, 33, p.shape, generator=gen) / 16.0).to(dtype))
        if "master_param" in st:
            st["master_param"].copy_(torch.randint(-32, 33, p.shape, generator=gen) / 16.0)
        g = torch.randint(1, 9, p.shape, generator=gen) / 8.0 * (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1)
        p.grad = (g * (scale or 1.0)).to(dtype)
    group = opt.param_groups[0]
    expected = []
    for p in ps:
        st = opt.state[p]
        theta = (st["master_param"] if master else p.detach()).float().clone()
        g = p.grad.float() / (scale or 1.0)
        expected.append(_adafactor_ops(
            theta, g, {k: v.clone() for k, v in st.items()}, t=float(st["step"]) + 1,
            lr=group["lr"], eps1=group["eps"][0], eps2=group["eps"][1], decay_rate=group["decay_rate"],
            beta1=group["beta1"], wd=group["weight_decay"], relative_step=group["relative_step"],
            warmup_init=group["warmup_init"], scale_parameter=group["scale_parameter"],
            clip_threshold=group["clip_threshold"]))
        expected[-1]["grad"] = g.to(dtype)
        expected[-1]["step"] = st["step"] + 1
    if scale is not None:
        opt.grad_scale, opt.found_inf = _f32(scale), _f32(0.0)
    opt.step()
    for i, (p, exp) in enumerate(zip(ps, expected)):
        st = opt.state[p]
        theta = exp.pop("theta")
        got = dict(param=p.detach(), grad=p.grad, **st)
        want = dict(exp, param=theta.to(dtype))
        if master:
            want["master_param"] = theta
        for key, value in want.items():
            bad = (got[key].reshape(-1).float() != value.reshape(-1).float()).sum().item()
            assert bad == 0, f"tensor {i} {tuple(p.shape)} {key}: {bad} of {value.numel()} elements differ"


def _adafactor_run(dtype, master, steps=4, seed=0):
    """Params and state after `steps` native Adafactor steps: matrices of many tiles (so that threads share them),
    one wider than a band pass of the CPU engine, batches, flat tensors, zero-size ones; momentum and weight
    decay."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 700), (3, 40, 130), (70000,), (333,), (), (0,), (5, 0), (40, 4500)]  # the last: > 1 band pass
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    opt = fused_optim.FusedAdafactor(ps, beta1=0.9, weight_decay=0.1, backend="native", master_weights=master)
    for k in range(steps):
        _step([(ps, opt)], _grads(ps, 100 + k))
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_adafactor_bitwise_deterministic_across_runs_threads_and_isas(dtype, master, monkeypatch):
    """Row/column statistics and RMS sums are reduced in a fixed order, the same for any thread count and either
    ISA build of the CPU loops: twice, with 1 thread, and with the baseline ISA, bit for bit."""
    first = _adafactor_run(dtype, master)
    _bitwise_equal(first, _adafactor_run(dtype, master))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _bitwise_equal(first, _adafactor_run(dtype, master))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("FUSED_OPTIM_CPU_ISA", "baseline")
    assert "cpu: baseline," in torch.ops.fused_optim.build_info()
    _bitwise_equal(first, _adafactor_run(dtype, master))


def test_adafactor_ops_declare_what_they_mutate():
    def mutated(op):
        schema = getattr(torch.ops.fused_optim, op).default._schema
        return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated("adafactor_pass1_") == {"partials"}
    assert mutated("adafactor_statistics_") == {"exp_avg_sq_rows", "exp_avg_sq_cols", "stats"}
    assert mutated("adafactor_pass2_") == {"exp_avg_sqs", "usq_partials"}
    assert mutated("adafactor_pass3_") == {"params", "grads", "exp_avgs", "master_params", "steps", "arrivals"}
    assert mutated("segment_sums_") == {"out"}


def test_adafactor_engines_read_the_tile_layout_of_tables_py():
    from fused_optim.tables import TILE_META_FIELDS
    assert tuple(torch.ops.fused_optim.tile_meta_fields()) == TILE_META_FIELDS


def _adafactor_setup(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    opt = fused_optim.FusedAdafactor(ps, backend="native")
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    (bucket,) = opt._collect()
    bucket.states = [opt.state[p] for p in bucket.params]
    return opt, bucket


def test_adafactor_ops_refuse_stale_or_foreign_tables():
    """On the CPU the operators check the tile table against the tensors: a table of other tensors, of other
    shapes, or built with another tile size is an error naming the problem, not a write out of bounds."""
    from fused_optim.tables import TileTable
    shapes = [(40, 6), (7,), (2, 3, 5)]
    opt, bucket = _adafactor_setup(shapes)
    hp = opt._rule_hyperparameters(opt.param_groups[0])
    launcher = native.RULES["adafactor"]
    operands = bucket.operands(launcher.OPERANDS)
    table = launcher.build_table(operands, CPU)
    launcher(table, operands, hp)  # the right table: fine

    _, other = _adafactor_setup(shapes, seed=1)
    with pytest.raises(RuntimeError, match="param table does not hold the address of param 0.*stale"):
        launcher(table, other.operands(launcher.OPERANDS), hp)
    _, reshaped = _adafactor_setup([(6, 40), (7,), (2, 3, 5)])
    with pytest.raises(RuntimeError, match=r"params\[0\] of shape \[6, 40\].*table has it as a batch of 40 x 6"):
        launcher(table, reshaped.operands(launcher.OPERANDS), hp)
    small_tiles = TileTable.build(operands, CPU, matrix=[p.dim() >= 2 for p in operands["param"]], tile=(16, 64))
    with pytest.raises(RuntimeError, match="32 x 128 tiles"):
        launcher(small_tiles, operands, hp)
    no_row_state = dict(operands, exp_avg_sq_row=[None] * len(shapes))
    with pytest.raises(RuntimeError, match="tensor 0 of a launch group has no 'exp_avg_sq_row' state"):
        launcher(table, no_row_state, hp)


def test_adafactor_ops_check_their_arguments():
    opt, bucket = _adafactor_setup([(40, 6), (7,)])
    launcher = native.RULES["adafactor"]
    operands = bucket.operands(launcher.OPERANDS)
    table = launcher.build_table(operands, CPU)
    work = table.scratch()
    ops = torch.ops.fused_optim
    tables = [table.ptrs[name] for name in native.ADAFACTOR_OPERANDS]
    partials = work["partials"]
    ok = (operands["param"], operands["grad"], [], tables, table.meta, table.tile_tensor, partials, table.n_partials,
          1e-30, None, None)
    ops.adafactor_pass1_(*ok)
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors but params has 2; pass one per param"):
        ops.adafactor_pass1_(ok[0], ok[1][:1], *ok[2:])
    with pytest.raises(RuntimeError, match="master_params were given for float32 params"):
        ops.adafactor_pass1_(ok[0], ok[1], [torch.zeros(40, 6), torch.zeros(7)], *ok[3:])
    with pytest.raises(RuntimeError, match="partials must be a contiguous Float vector of"):
        ops.adafactor_pass1_(*ok[:6], partials[:-1], *ok[7:])
    with pytest.raises(RuntimeError, match="n_partials is"):
        ops.adafactor_pass1_(*ok[:7], table.n_partials - 1, *ok[8:])
    with pytest.raises(RuntimeError, match="expected 8 address tables"):
        ops.adafactor_pass1_(ok[0], ok[1], ok[2], tables[:7], *ok[4:])
    with pytest.raises(RuntimeError, match="grad_scale must be a 1-element float32 tensor"):
        ops.adafactor_pass1_(*ok[:9], torch.ones(2), None)
    with pytest.raises(RuntimeError, match="exp_avg_sqs has 2 tensors but the table has 1 flat params"):
        ops.adafactor_pass2_(operands["grad"], [torch.zeros(7), torch.zeros(7)], operands["step"], tables, table.meta,
                             table.tile_tensor, work["stats"], work["batch_sums"],
                             work["usq_partials"], 1e-30, -0.8, None, None)
    with pytest.raises(RuntimeError, match="beta1 is set but exp_avgs is empty"):
        ops.adafactor_pass3_(operands["param"], operands["grad"], [operands["exp_avg_sq"][1]], [], [],
                             operands["step"], tables, table.meta, table.tile_tensor, table.arrivals,
                             work["stats"], work["batch_sums"], work["usq_sums"], None, None, 1e-3,
                             1.0, 0.9, 0.0, True, True, False, None, None)
    with pytest.raises(RuntimeError, match="relative_step=False needs an external learning rate"):
        ops.adafactor_pass3_(operands["param"], operands["grad"], [operands["exp_avg_sq"][1]], [], [],
                             operands["step"], tables, table.meta, table.tile_tensor, table.arrivals,
                             work["stats"], work["batch_sums"], work["usq_sums"], None, None, 1e-3,
                             1.0, None, 0.0, True, False, False, None, None)


def test_segment_sums_are_fixed_order_sums_of_each_segment():
    gen = torch.Generator().manual_seed(11)
    partials = torch.rand(5000, generator=gen) * torch.exp2(torch.randint(-20, 20, (5000,), generator=gen).float())
    seg = torch.tensor([0, 0, 1, 7, 3000, 3000, 5000])
    out = torch.full((6,), float("nan"))
    torch.ops.fused_optim.segment_sums_(partials, seg, out)
    want = [partials[a:b].double().sum().item() for a, b in zip(seg[:-1].tolist(), seg[1:].tolist())]
    for s, (got, w) in enumerate(zip(out.tolist(), want)):  # k terms in order: within (k - 1) eps32 of the sum
        k = int(seg[s + 1] - seg[s])
        assert abs(got - w) <= max(k - 1, 0) * 2.0 ** -24 * w, (s, got, w)
    sequential = torch.zeros(())
    for x in partials[7:3000]:
        sequential = sequential + x
    assert out[3].item() == sequential.item(), "each segment is added in order"
    with pytest.raises(RuntimeError, match="seg_start must be non-decreasing"):
        torch.ops.fused_optim.segment_sums_(partials, torch.tensor([0, 5, 3]), torch.zeros(2))
    with pytest.raises(RuntimeError, match="the last segment ends at 6000 but partials has 5000 entries"):
        torch.ops.fused_optim.segment_sums_(partials, torch.tensor([0, 6000]), torch.zeros(1))
