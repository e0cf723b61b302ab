"""FSDP2 keeps params, grads and optimizer state as DTensors; the kernels work on the local shards
(``to_local()``). Elementwise optimizers need nothing more: a one-process mesh must give the same result as
plain tensors. (Reducing optimizers such as LAMB and Adafactor add an all-reduce over the shard dimensions.)"""
import os

import pytest
import torch

import fused_optim
from cases import fused_backends
from conftest import DEVICE

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from torch.distributed.device_mesh import init_device_mesh
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    try:
        yield init_device_mesh(DEVICE.type, (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", fused_backends())
def test_dtensor_params_match_plain_tensors(mesh, backend):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    torch.manual_seed(0)
    full = [torch.randn(8, 5, device=DEVICE), torch.randn(7, device=DEVICE), torch.randn((), device=DEVICE)]
    placements = [[Shard(0)], [Shard(0)], [Shard(0)] if full[2].dim() else []]
    dparams = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl or None)) for t, pl in zip(full, placements)]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    od = fused_optim.FusedAdamW(dparams, lr=1e-2, backend=backend, amsgrad=True)
    op = fused_optim.FusedAdamW(plain, lr=1e-2, backend=backend, amsgrad=True)
    for _ in range(4):
        grads = [torch.randn(t.shape, device=DEVICE) for t in full]
        for p, g, pl in zip(dparams, grads, placements):
            p.grad = distribute_tensor(g.clone(), mesh, pl or None)
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        versions = [(d._version, d.to_local()._version) for d in dparams]
        od.step()
        op.step()
        for i, (d, (wrapper, local)) in enumerate(zip(dparams, versions)):
            # autograd sees an in-place update of the DTensor and of its shard (optimizer._mark_updated)
            assert d._version > wrapper and d.to_local()._version > local, f"param {i}"
    for d, p in zip(dparams, plain):
        assert torch.equal(d.full_tensor(), p.detach()), "the same kernel on the same local data"
        assert isinstance(od.state[d]["exp_avg"], DTensor), "state stays a DTensor, as torch.optim keeps it"
        assert torch.equal(od.state[d]["max_exp_avg_sq"].full_tensor(), op.state[p]["max_exp_avg_sq"])
        assert float(od.state[d]["step"]) == 4


@pytest.mark.parametrize("backend", fused_backends(rule="lamb"))
def test_lamb_on_dtensors_of_one_rank_matches_plain_tensors(mesh, backend):
    """A DTensor whose shard is the whole tensor (a one-rank mesh, or replicated) has the tensor's norms: LAMB runs
    on it, the same kernels on the same data as plain tensors, with max_grad_norm."""
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.manual_seed(0)
    full = [torch.randn(8, 5, device=DEVICE), torch.randn(7, device=DEVICE)]
    dparams = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    od = fused_optim.FusedLAMB(dparams, lr=1e-2, backend=backend, max_grad_norm=1.0)
    op = fused_optim.FusedLAMB(plain, lr=1e-2, backend=backend, max_grad_norm=1.0)
    for _ in range(3):
        grads = [torch.randn(t.shape, device=DEVICE) for t in full]
        for d, p, g in zip(dparams, plain, grads):
            d.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            p.grad = g.clone()
        od.step()
        op.step()
    for d, p in zip(dparams, plain):
        assert torch.equal(d.full_tensor(), p.detach())


@pytest.mark.parametrize("backend", ("reference",) + fused_backends(rule="lamb"))
def test_lamb_refuses_params_sharded_across_ranks(mesh, backend):
    """A param whose local shard is part of the tensor (FSDP2 on several ranks; made here on one rank with
    DTensor.from_local and a larger global shape): the shard's norms are not the tensor's, and no backend reduces
    them across ranks yet, so FusedLAMB refuses it when the group is added, naming it, rather than step wrongly."""
    from torch.distributed.tensor import DTensor, Shard
    whole = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    shard = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 5, device=DEVICE), mesh, [Shard(0)],
                                                  run_check=False, shape=torch.Size((8, 5)), stride=(5, 1)))
    with pytest.raises(NotImplementedError, match=r"FusedLAMB: param 1 of param group 0 is sharded across ranks "
                                                  r"\(a DTensor whose local shard has shape \(4, 5\) of \(8, 5\)"):
        fused_optim.FusedLAMB([whole, shard], backend=backend)
    opt = fused_optim.FusedLAMB([whole], backend=backend)
    with pytest.raises(NotImplementedError, match="param 0 of param group 1 is sharded across ranks"):
        opt.add_param_group({"params": [shard]})
    assert len(opt.param_groups) == 1
