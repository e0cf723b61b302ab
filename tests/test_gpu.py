"""Checks only a GPU can make: CUDA-graph capture of step(), params on several devices in one optimizer, and a
tensor of more than 2^31 elements. Marked ``gpu``: skipped without CUDA, run by benchmarks/gpu_verify.sh.
(The parity, interop and edge-case tests also run on CUDA tensors when a GPU is present; LAMB's own GPU checks
are in test_lamb.py.) Each check runs for AdamW and LAMB on every fused backend that has the optimizer's rule on
CUDA (tests/cases.py fused_backends), the native CUDA kernels included when the extension was built with them."""
import math

import pytest
import torch

import fused_optim
from cases import fused_backends

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")

# name -> (class, update rule, keywords of every instance, keywords of the captured instance only)
OPTIMIZERS = {
    "adamw": (fused_optim.FusedAdamW, "adam", dict(amsgrad=True), dict(capturable=True)),
    "lamb": (fused_optim.FusedLAMB, "lamb", dict(max_grad_norm=1.0, trust_clip=(0.0, 5.0)), {}),
}


def cases():
    """(optimizer, backend) for every fused backend that has the optimizer's rule on CUDA."""
    return [pytest.param(name, backend, id=f"{name}-{backend}") for name, (_, rule, _, _) in OPTIMIZERS.items()
            for backend in (fused_backends(CUDA, rule) if torch.cuda.is_available() else ["triton"])]


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(CUDA).requires_grad_() for s in [(), (1,), (0,), (4097,), (33, 65)]]


@pytest.mark.parametrize("name,backend", cases())
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_cuda_graph_replay_matches_eager(name, backend, dtype, master):
    cls, _, kw, graph_kw = OPTIMIZERS[name]
    pg = [p.detach().to(dtype).requires_grad_() for p in _params(0)]
    pe = [p.detach().clone().requires_grad_() for p in pg]
    lr = torch.tensor(1e-2, device=CUDA)
    og = cls(pg, lr=lr, backend=backend, master_weights=master, **kw, **graph_kw)
    # The captured step reads lr from an fp32 tensor: the eager step gets the same fp32 value as a float.
    oe = cls(pe, lr=float(lr), backend=backend, master_weights=master, **kw)
    static = [torch.zeros_like(p) for p in pg]
    for p, s in zip(pg, static):
        p.grad = s
    gen = torch.Generator(device=CUDA).manual_seed(1)

    def new_grads():
        return [torch.randn(p.shape, device=CUDA, generator=gen).to(dtype) for p in pg]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: state and device tables are created outside the capture
            grads = new_grads()
            for s, g, p in zip(static, grads, pe):
                s.copy_(g)
                p.grad = g.clone()
            og.step()
            oe.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    for k in range(10):
        new_lr = 1e-2 if k < 5 else 3e-3
        lr.fill_(new_lr)
        oe.param_groups[0]["lr"] = float(lr)
        grads = new_grads()
        for s, g, p in zip(static, grads, pe):
            s.copy_(g)
            p.grad = g.clone()
        graph.replay()
        oe.step()
    torch.cuda.synchronize()
    for a, b in zip(pg, pe):
        assert torch.equal(a, b), "graph replay and eager run the same kernel on the same inputs: bitwise equal"
        assert float(og.state[a]["step"]) == float(oe.state[b]["step"]) == 13


def test_params_on_cpu_and_cuda_in_one_optimizer():
    """auto runs each device with its own backend; results match the reference on both."""
    def mk():
        torch.manual_seed(2)
        return [torch.randn(7).requires_grad_(), torch.randn(9, device=CUDA).requires_grad_()]
    a, b = mk(), mk()
    oa = fused_optim.FusedAdamW(a, lr=1e-2)
    ob = fused_optim.FusedAdamW(b, lr=1e-2, backend="reference")
    for _ in range(5):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, device=pa.device)
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    with pytest.raises(fused_optim.BackendUnavailable, match="param 0 of param group 0"):
        fused_optim.FusedAdamW(mk(), backend="triton")  # the CPU param cannot run on compiled Triton


@pytest.mark.parametrize("name,backend", cases())
def test_tensor_larger_than_2_pow_31_elements(name, backend):
    """64-bit indexing: every element of a 2^31 + 7 element tensor is updated (34 GB of fp32 p, g, m, v)."""
    n = 2 ** 31 + 7
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 4 * n + (1 << 30):
        pytest.skip(f"needs {4 * 4 * n / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    p = torch.zeros(n, device=CUDA).requires_grad_()
    p.grad = torch.ones(n, device=CUDA)
    cls = fused_optim.FusedAdam if name == "adamw" else OPTIMIZERS[name][0]
    opt = cls([p], lr=0.5, backend=backend)
    opt.step()
    # The first step with a constant grad moves every element by -lr * 1 / (1 + eps) ~ -lr: Adam's, and LAMB's
    # (m^ = v^ = 1, u = 1 / (1 + eps), and ||theta|| = 0 gives r = 1; ||u||^2 is a sum over 524,289 blocks).
    for idx in (0, 2 ** 31 - 1, 2 ** 31, n - 1):
        assert abs(p[idx].item() + 0.5) < 1e-6, f"element {idx} = {p[idx].item()}"
    assert (p.detach() == p[0]).all().item(), "every element takes the same step"
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("name,backend", cases())
def test_step_never_synchronizes_with_the_host(name, backend):
    """torch's sync debug mode raises on any host-device synchronization (``.item()``, pageable copies, ...):
    a step, a step with GradScaler tensors, a tensor lr, and a table rebuild after zero_grad(set_to_none=True)."""
    cls, _, kw, _ = OPTIMIZERS[name]
    params = _params(3)
    opt = cls(params, lr=torch.tensor(1e-2, device=CUDA), backend=backend, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: lazy state init (allocations) outside the checked region
    torch.cuda.synchronize()
    scale, found = torch.tensor(4.0, device=CUDA), torch.tensor(0.0, device=CUDA)  # made before the check: a copy
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.grad_scale, opt.found_inf = scale, found
        opt.step()
        del opt.grad_scale, opt.found_inf
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # new grad storage: the device table is rebuilt (pinned, asynchronous copy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert float(opt.state[params[0]]["step"]) == 4


# ----------------------------------------------------------------------------------------------------------------
# FusedAdafactor (its parity and CUDA-graph tests on CUDA are in test_adafactor.py, for the same backends)
# ----------------------------------------------------------------------------------------------------------------
ADAFACTOR_BACKENDS = fused_backends(CUDA, rule="adafactor") if torch.cuda.is_available() else ["triton"]


@pytest.mark.parametrize("backend", ADAFACTOR_BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_adafactor_cuda_graph_with_scaler_skips_and_odd_views(backend, dtype, master):
    """Seven launches per step captured once, replayed with GradScaler's found_inf read on the device: skipped
    replays change nothing, the others equal eager steps bit for bit; odd-offset views (scalar loads) next to
    aligned tensors (vector loads), a matrix whose width is not a multiple of 4, bf16 with master weights."""
    def make():
        g = torch.Generator().manual_seed(4)
        shapes = [(96, 260), (2, 33, 129), (4097,), ()]
        ps = [torch.randn(s, generator=g).to(CUDA, dtype).requires_grad_() for s in shapes]
        flat = torch.randn(9000, generator=g).to(CUDA, dtype)
        return ps + [torch.nn.Parameter(flat[1:4100]), torch.nn.Parameter(flat[4101:4101 + 40 * 61].view(40, 61))]
    pg, pe = make(), make()
    kw = dict(beta1=0.9, weight_decay=0.01, backend=backend, master_weights=master)
    og, oe = fused_optim.FusedAdafactor(pg, **kw), fused_optim.FusedAdafactor(pe, **kw)
    scale, found = torch.tensor(64.0, device=CUDA), torch.zeros((), device=CUDA)
    static = [torch.zeros_like(p) for p in pg]
    for p, s in zip(pg, static):
        p.grad = s
    og.grad_scale, og.found_inf = scale, found

    def grads(k):
        g = torch.Generator(device=CUDA).manual_seed(k)
        return [torch.randn(p.shape, device=CUDA, generator=g).to(dtype) for p in pg]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s, gr in zip(static, grads(0)):
            s.copy_(gr * 64.0)
        og.step()  # warm-up: state, tables and scratch buffers are created outside the capture
    torch.cuda.current_stream().wait_stream(side)
    for p, gr in zip(pe, grads(0)):
        p.grad = gr.clone()
    oe.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    steps = 1
    for k in range(1, 7):
        skip = k in (2, 5)
        found.fill_(1.0 if skip else 0.0)
        for s, gr in zip(static, grads(k)):
            s.copy_(gr * 64.0)
        before = [p.detach().clone() for p in pg]
        graph.replay()
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, pg)), "a skipped replay changed a param"
            continue
        steps += 1
        for p, gr in zip(pe, grads(k)):
            p.grad = gr.clone()
        oe.step()
    torch.cuda.synchronize()
    for a, b in zip(pg, pe):
        assert torch.equal(a, b), "graph replay and eager run the same kernels on the same inputs"
        assert float(og.state[a]["step"]) == float(oe.state[b]["step"]) == steps
        for key in oe.state[b]:
            assert torch.equal(og.state[a][key], oe.state[b][key]), key


@pytest.mark.parametrize("backend", ADAFACTOR_BACKENDS)
def test_adafactor_step_never_synchronizes_with_the_host(backend):
    """RMS(θ), RMS(U), mean(R) and the step size stay on the device: a step, a step with GradScaler's tensors and a
    tensor lr, and a table rebuild after zero_grad(set_to_none=True), in torch's sync debug mode."""
    params = _params(3) + [torch.randn(3, 40, 50, device=CUDA).requires_grad_()]
    opt = fused_optim.FusedAdafactor(params, lr=torch.tensor(1e-2, device=CUDA), relative_step=False, beta1=0.9,
                                     backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # lazy state init (allocations) and scratch buffers outside the checked region
    torch.cuda.synchronize()
    scale, found = torch.tensor(4.0, device=CUDA), torch.tensor(0.0, device=CUDA)  # made before the check: a copy
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
    assert float(opt.state[params[-1]]["step"]) == 4


@pytest.mark.parametrize("backend", ADAFACTOR_BACKENDS)
@pytest.mark.parametrize("shape", [(2 ** 31 + 7,), (2 ** 16 + 1, 2 ** 15)], ids=["flat", "matrix"])
def test_adafactor_tensor_larger_than_2_pow_31_elements(backend, shape):
    """64-bit indexing in the tile map: a flat tensor and a matrix of more than 2^31 elements are updated
    everywhere. First step, g = 1, fixed lr 0.5, no parameter scaling: V̂ = 1 (R = C = 1 + ε1), U = 1, RMS(U) <= 1
    (no clipping), so every element moves by exactly -0.5."""
    n = math.prod(shape)
    need = 4 * n * (3 if len(shape) == 1 else 2)  # p, g (and V for a flat tensor); R and C are n + m floats
    free, _ = torch.cuda.mem_get_info()
    if free < need + (1 << 30):
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    p = torch.zeros(shape, device=CUDA).requires_grad_()
    p.grad = torch.ones(shape, device=CUDA)
    opt = fused_optim.FusedAdafactor([p], lr=0.5, relative_step=False, scale_parameter=False, backend=backend)
    opt.step()
    flat = p.detach().view(-1)
    for idx in (0, 2 ** 31 - 1, 2 ** 31, n - 1):
        assert flat[idx].item() == -0.5, f"element {idx} = {flat[idx].item()}"
    assert (flat == -0.5).all().item(), "every element takes the same step"
    assert float(opt.state[p]["step"]) == 1
