"""Checks only a GPU can make: CUDA-graph capture of step(), params on several devices in one optimizer, and a
tensor of more than 2^31 elements. Marked ``gpu``: skipped without CUDA, run by benchmarks/gpu_verify.sh.
(The parity, interop and edge-case tests also run on CUDA tensors when a GPU is present.)"""
import pytest
import torch

import fused_optim
from cases import fused_backends

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(CUDA).requires_grad_() for s in [(), (1,), (0,), (4097,), (33, 65)]]


@pytest.mark.parametrize("backend", fused_backends(CUDA) if torch.cuda.is_available() else ["triton"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_cuda_graph_replay_matches_eager(backend, dtype, master):
    pg = [p.detach().to(dtype).requires_grad_() for p in _params(0)]
    pe = [p.detach().clone().requires_grad_() for p in pg]
    lr = torch.tensor(1e-2, device=CUDA)
    og = fused_optim.FusedAdamW(pg, lr=lr, capturable=True, backend=backend, master_weights=master, amsgrad=True)
    oe = fused_optim.FusedAdamW(pe, lr=1e-2, backend=backend, master_weights=master, amsgrad=True)
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
        oe.param_groups[0]["lr"] = new_lr
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


@pytest.mark.parametrize("backend", fused_backends(CUDA) if torch.cuda.is_available() else ["triton"])
def test_tensor_larger_than_2_pow_31_elements(backend):
    """64-bit indexing: every element of a 2^31 + 7 element tensor is updated (34 GB of fp32 p, g, m, v)."""
    n = 2 ** 31 + 7
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 4 * n + (1 << 30):
        pytest.skip(f"needs {4 * 4 * n / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    p = torch.zeros(n, device=CUDA).requires_grad_()
    p.grad = torch.ones(n, device=CUDA)
    opt = fused_optim.FusedAdam([p], lr=0.5, backend=backend)
    opt.step()
    # Adam's first step with a constant grad moves every element by exactly -lr * 1 / (1 + eps / ...) ~ -lr
    for idx in (0, 2 ** 31 - 1, 2 ** 31, n - 1):
        assert abs(p[idx].item() + 0.5) < 1e-6, f"element {idx} = {p[idx].item()}"
    assert (p.detach() == p[0]).all().item(), "every element takes the same step"
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("backend", fused_backends(CUDA) if torch.cuda.is_available() else ["triton"])
def test_step_never_synchronizes_with_the_host(backend):
    """torch's sync debug mode raises on any host-device synchronization (``.item()``, pageable copies, ...):
    a step, a step with GradScaler tensors, a tensor lr, and a table rebuild after zero_grad(set_to_none=True)."""
    params = _params(3)
    opt = fused_optim.FusedAdamW(params, lr=torch.tensor(1e-2, device=CUDA), backend=backend, amsgrad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: lazy state init (allocations) outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.grad_scale = torch.tensor(4.0, device=CUDA)
        opt.found_inf = torch.tensor(0.0, device=CUDA)
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
