"""Drop-in compatibility with torch.optim: state_dict both ways, lr schedulers, GradScaler, keyword checks.

Runs for every usable fused backend (tests/cases.py). Parity bounds: tests/tolerances.py (fp32, 2 ulps of
params after <= 20 steps is the measured gap; the derived bound is used)."""
import copy
import io

import pytest
import torch

import fused_optim
from cases import fused_backends
from conftest import DEVICE
from tolerances import assert_close_atol, theta_atol

BACKENDS = fused_backends()
PAIRS = [(fused_optim.FusedAdam, torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
         (fused_optim.FusedAdamW, torch.optim.AdamW, dict(weight_decay=0.1))]


def model(dtype=torch.float32):
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3))
    return m.to(device=DEVICE, dtype=dtype)


def train(m, opt, steps, seed, scheduler=None, scaler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 13, generator=gen).to(device=DEVICE, dtype=next(m.parameters()).dtype)
        opt.zero_grad(set_to_none=True)
        loss = m(x).float().square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_models_close(a, b, steps, lr=1e-2):
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_close_atol(pa.detach(), pb.detach(), theta_atol([lr] * steps, pb.abs().max().item()), "param")


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours_cls,torch_cls,kw", PAIRS, ids=["adam", "adamw"])
def test_state_dict_torch_to_ours(backend, ours_cls, torch_cls, kw):
    """Train 5 steps with torch.optim, load its state into ours, train 5 more; compare with torch throughout."""
    m_ref, m_ours = model(), model()
    ref = torch_cls(m_ref.parameters(), lr=1e-2, foreach=False, **kw)
    warm = torch_cls(m_ours.parameters(), lr=1e-2, foreach=False, **kw)
    train(m_ref, ref, 5, seed=0)
    train(m_ours, warm, 5, seed=0)
    ours = ours_cls(m_ours.parameters(), lr=1e-2, backend=backend, **kw)
    ours.load_state_dict(roundtrip(warm.state_dict()))
    st = ours.state[next(m_ours.parameters())]
    assert st["step"].dtype == torch.float32 and st["step"].device == next(m_ours.parameters()).device
    assert float(st["step"]) == 5
    train(m_ref, ref, 5, seed=1)
    train(m_ours, ours, 5, seed=1)
    assert_models_close(m_ours, m_ref, 10)
    for p_o, p_r in zip(m_ours.parameters(), m_ref.parameters()):
        assert float(ours.state[p_o]["step"]) == float(ref.state[p_r]["step"]) == 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours_cls,torch_cls,kw", PAIRS, ids=["adam", "adamw"])
def test_state_dict_ours_to_torch(backend, ours_cls, torch_cls, kw):
    """Train 5 steps with ours, load our state into torch.optim, continue; compare with ours throughout."""
    m_ours, m_torch = model(), model()
    ours = ours_cls(m_ours.parameters(), lr=1e-2, backend=backend, **kw)
    first = ours_cls(m_torch.parameters(), lr=1e-2, backend=backend, **kw)
    train(m_ours, ours, 5, seed=0)
    train(m_torch, first, 5, seed=0)
    sd = roundtrip(first.state_dict())
    assert set(sd["state"][0]) >= {"step", "exp_avg", "exp_avg_sq"}
    theirs = torch_cls(m_torch.parameters(), lr=1e-2, foreach=False, **kw)
    theirs.load_state_dict(sd)
    train(m_ours, ours, 5, seed=1)
    train(m_torch, theirs, 5, seed=1)
    assert_models_close(m_torch, m_ours, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_keeps_fp32_state_for_bf16_params(backend):
    """torch casts loaded state to the param dtype; ours keeps fp32 moments and the fp32 master copy."""
    m = model(torch.bfloat16)
    opt = fused_optim.FusedAdamW(m.parameters(), lr=1e-2, backend=backend, master_weights=True)
    train(m, opt, 3, seed=0)
    sd = roundtrip(opt.state_dict())
    m2 = model(torch.bfloat16)
    opt2 = fused_optim.FusedAdamW(m2.parameters(), lr=1e-2, backend=backend, master_weights=True)
    opt2.load_state_dict(sd)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert opt2.state[p2][key].dtype == torch.float32, key
            assert torch.equal(opt2.state[p2][key], opt.state[p][key]), key
    # and a torch state with bf16 moments (torch keeps state in the param dtype) is upcast, not kept bf16
    m3 = model(torch.bfloat16)
    tor = torch.optim.AdamW(m3.parameters(), lr=1e-2, foreach=False)
    train(m3, tor, 2, seed=0)
    assert tor.state[next(m3.parameters())]["exp_avg"].dtype == torch.bfloat16
    opt3 = fused_optim.FusedAdamW(m3.parameters(), lr=1e-2, backend=backend)
    opt3.load_state_dict(tor.state_dict())
    assert opt3.state[next(m3.parameters())]["exp_avg"].dtype == torch.float32
    train(m3, opt3, 1, seed=1)  # and steps fine from there


@pytest.mark.parametrize("cls", [fused_optim.FusedAdamW, fused_optim.FusedLAMB, fused_optim.FusedAdafactor])
def test_load_state_dict_hooks_edit_what_is_loaded(cls):
    """As torch's: a load pre-hook's returned state_dict is what is loaded, and a post-hook's edits stay. The fp32
    state is restored from what the pre-hooks returned, before the post-hooks run (before, it was restored from
    the state_dict given, after every hook: a hook that dropped or reset state did nothing). bf16 params with
    master weights: the state torch would cast to bf16 stays fp32, from the edited dict."""
    m = model(torch.bfloat16)
    kw = dict(backend="reference", master_weights=True, **({} if cls is fused_optim.FusedAdafactor else {"lr": 1e-2}))
    opt = cls(m.parameters(), **kw)
    train(m, opt, 2, seed=0)
    sd = opt.state_dict()

    fresh = cls(m.parameters(), **kw)
    fresh.register_load_state_dict_pre_hook(lambda o, d: {**d, "state": {}})
    fresh.load_state_dict(sd)
    assert len(fresh.state) == 0

    doubled = cls(m.parameters(), **kw)
    doubled.register_load_state_dict_pre_hook(
        lambda o, d: {**d, "state": {i: {k: v * 2 if k == "master_param" else v for k, v in s.items()}
                                     for i, s in d["state"].items()}})
    reset = []
    doubled.register_load_state_dict_post_hook(
        lambda o: reset.extend(s.__setitem__("step", torch.zeros_like(s["step"])) for s in o.state.values()))
    doubled.load_state_dict(sd)
    assert len(reset) == len(opt.state) > 0
    for p in m.parameters():
        st = doubled.state[p]
        assert st["master_param"].dtype == torch.float32
        assert torch.equal(st["master_param"], opt.state[p]["master_param"] * 2)  # exact in fp32: from the hook
        assert float(st["step"]) == 0.0


@pytest.mark.parametrize("saved,here", [("reference", BACKENDS[-1]), (BACKENDS[-1], "reference"),
                                        ("reference", "auto")])
def test_load_state_dict_keeps_this_optimizers_backend(saved, here):
    """A checkpoint's groups bring every option (lr, betas, master_weights, ...) but ``backend``, which says where
    the step runs: a checkpoint of a triton run on a GPU machine must load into a native or CPU run."""
    m = model()
    opt = fused_optim.FusedAdamW(m.parameters(), lr=1e-2, backend=saved)
    train(m, opt, 1, seed=0)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    other = fused_optim.FusedAdamW(m.parameters(), lr=1e-2, backend=here)
    other.load_state_dict(sd)
    assert other.param_groups[0]["backend"] == here
    assert other.param_groups[0]["lr"] == 0.5
    train(m, other, 1, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler(backend):
    m_ours, m_ref = model(), model()
    ours = fused_optim.FusedAdamW(m_ours.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, foreach=False)
    s_ours = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=2e-2, total_steps=12)
    s_ref = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=2e-2, total_steps=12)
    train(m_ours, ours, 12, seed=0, scheduler=s_ours)
    train(m_ref, ref, 12, seed=0, scheduler=s_ref)
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert_models_close(m_ours, m_ref, 12, lr=2e-2)


def _grad_scaler():
    return torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10, growth_interval=1)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_grad_scaler_skips_inf_step(backend):
    """With a GradScaler, ours and torch's fused AdamW take the same steps and skip the same one (inf grad)."""
    m_ours, m_ref = model(), model()
    ours = fused_optim.FusedAdamW(m_ours.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, fused=True)
    sc_ours, sc_ref = _grad_scaler(), _grad_scaler()
    train(m_ours, ours, 3, seed=0, scaler=sc_ours)
    train(m_ref, ref, 3, seed=0, scaler=sc_ref)

    p0 = next(m_ours.parameters())
    before = {k: v.clone() for k, v in ours.state[p0].items()}
    params_before = [p.detach().clone() for p in m_ours.parameters()]
    scale_before = sc_ours.get_scale()
    for m, opt, sc in ((m_ours, ours, sc_ours), (m_ref, ref, sc_ref)):
        opt.zero_grad()
        loss = m(torch.full((4, 13), float("inf"), device=DEVICE)).sum()
        sc.scale(loss).backward()
        sc.step(opt)
        sc.update()
    assert all(torch.equal(a, b.detach()) for a, b in zip(params_before, m_ours.parameters()))
    for k, v in before.items():
        assert torch.equal(ours.state[p0][k], v), f"{k} changed in a skipped step"
    assert float(ours.state[p0]["step"]) == 3
    assert sc_ours.get_scale() == scale_before / 2

    train(m_ours, ours, 3, seed=1, scaler=sc_ours)
    train(m_ref, ref, 3, seed=1, scaler=sc_ref)
    assert_models_close(m_ours, m_ref, 6)
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_grad_scaler_unscales_grads_in_the_step(backend):
    """The grad the update uses is divided by the scale, and written back unscaled (as torch's fused). Adam's
    update hardly depends on the grad's scale (only through eps), so the moments show it: after one step they
    are (1 - beta1) g and (1 - beta2) g^2 of the unscaled grad, the same fp32 operations as torch.optim.Adam's
    on that grad, so bitwise equal (a grad left scaled by 8 makes them 8 and 64 times too large)."""
    p = torch.nn.Parameter(torch.ones(5, device=DEVICE))
    q = torch.nn.Parameter(torch.ones(5, device=DEVICE))
    ours = fused_optim.FusedAdam([p], lr=0.1, backend=backend)
    theirs = torch.optim.Adam([q], lr=0.1, foreach=False)
    g = torch.arange(1.0, 6.0, device=DEVICE)
    p.grad = g * 8
    ours.grad_scale = torch.tensor(8.0, device=DEVICE)
    ours.found_inf = torch.tensor(0.0, device=DEVICE)
    ours.step()
    q.grad = g.clone()
    theirs.step()
    assert torch.equal(p.grad, g)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[p][key], theirs.state[q][key]), key
    # the param: a few fp32 roundings of values ~1 (the update is lr = 0.1 in size, scale or not)
    torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_signature_matches_torch():
    """Tools probe signatures: every torch keyword exists with the same default."""
    import inspect
    for ours, theirs in ((fused_optim.FusedAdam, torch.optim.Adam), (fused_optim.FusedAdamW, torch.optim.AdamW)):
        o, t = inspect.signature(ours.__init__).parameters, inspect.signature(theirs.__init__).parameters
        for name, par in t.items():
            assert name in o, f"{ours.__name__} lacks keyword {name}"
            assert o[name].default == par.default, f"{ours.__name__}.{name} default {o[name].default} != {par.default}"
        assert ours._step_supports_amp_scaling


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(eps=-1.0), "Invalid epsilon"),
    (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(backend="cuda"), "Invalid backend"),
    (dict(foreach=True), "foreach=True"),
    (dict(fused=False), "always fused"),
    (dict(differentiable=True), "differentiable"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_optim.FusedAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_accepted_torch_keywords():
    p = [torch.nn.Parameter(torch.ones(2))]
    opt = fused_optim.FusedAdamW(p, foreach=None, fused=True, capturable=True)
    assert opt.defaults["capturable"] is True
    opt = fused_optim.FusedAdam(p, foreach=False, fused=None, betas=(torch.tensor(0.9), torch.tensor(0.99)))
    assert opt.defaults["betas"] == (0.8999999761581421, 0.9900000095367432)  # float32 tensors, as given


def test_deepcopy_and_pickle():
    m = model()
    opt = fused_optim.FusedAdamW(m.parameters(), lr=1e-2, backend="reference")
    train(m, opt, 2, seed=0)
    opt2 = copy.deepcopy(opt)
    assert float(opt2.state[next(opt2.param_groups[0]["params"].__iter__())]["step"]) == 2


VERSION_CASES = [("torch-adamw", None)] + [(name, b) for name in ("adamw", "lamb", "adafactor")
                                           for b in BACKENDS + ("reference",)]


@pytest.mark.parametrize("name,backend", VERSION_CASES, ids=[f"{n}-{b}" for n, b in VERSION_CASES])
def test_step_bumps_param_versions_as_torch(name, backend):
    """A step updates params in place, so autograd must refuse a backward through a graph that saved a param before
    the step (torch.optim's in-place ops bump the version counter; the fused kernels write through raw addresses and
    the optimizer bumps it). Checked on the first step (full path) and on later ones (the step plan)."""
    w = torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))
    x = torch.randn(2, 4, device=DEVICE)
    if name == "torch-adamw":
        opt = torch.optim.AdamW([w], lr=1e-2)
    else:
        cls = {"adamw": fused_optim.FusedAdamW, "lamb": fused_optim.FusedLAMB, "adafactor": fused_optim.FusedAdafactor}
        opt = cls[name]([w], backend=backend, **({} if name == "adafactor" else {"lr": 1e-2}))
    for step in range(3):
        w.grad = torch.randn_like(w)
        y = (x @ w.square()).sum()  # the backward of square() reads w
        version = w._version
        opt.step()
        assert w._version > version, f"step {step}"
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
