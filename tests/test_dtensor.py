"""FSDP2 keeps params, grads and optimizer state as DTensors; the kernels work on the local shards
(``to_local()``). Elementwise optimizers need nothing more: a one-process mesh must give the same result as
plain tensors. LAMB adds its per-tensor sums of squares over the ranks holding the shards (an all-reduce per
sharded mesh dimension), tested on two CPU ranks; Adafactor refuses DTensor params."""
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


def _lamb_on_two_ranks(rank: int, store: str, backends: tuple) -> None:
    """One rank of test_lamb_on_params_sharded_across_two_ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        # Shard(0) of each: 8 rows 4 + 4; 7 elements 4 + 3; one row: rank 1 holds an empty shard; 4,100 elements
        # in shards of 2,050, not a whole 4,096-element block on either rank.
        shapes = [(8, 5), (7,), (1, 6), (2, 2050)]
        for backend in backends:
            gen = torch.Generator().manual_seed(0)  # the same values on both ranks
            full = [torch.randn(s, generator=gen) for s in shapes]
            sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
            plain = [torch.nn.Parameter(t.clone()) for t in full]
            groups = lambda ps: [dict(params=ps[:3], weight_decay=0.01),  # noqa: E731
                                 dict(params=ps[3:], weight_decay=0.1, trust_clip=(0.5, 2.0))]
            opt_s = fused_optim.FusedLAMB(groups(sharded), lr=1e-2, backend=backend, max_grad_norm=1.0)
            opt_p = fused_optim.FusedLAMB(groups(plain), lr=1e-2, backend=backend, max_grad_norm=1.0)
            bound = [0.0] * len(shapes)
            moment_bound = [dict(exp_avg=0.0, exp_avg_sq=0.0) for _ in shapes]
            for _ in range(4):
                grads = [torch.randn(s, generator=gen) for s in shapes]
                for d, p, g in zip(sharded, plain, grads):
                    d.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                    p.grad = g.clone()
                before = [p.detach().clone() for p in plain]
                opt_s.step()
                opt_p.step()
                for i, (p, b) in enumerate(zip(plain, before)):
                    # The two runs differ only in how float64 sums of squares associate (the shards' sums added by
                    # the all-reduce): the ratio and the clip coefficient, rounded to fp32, may differ by an ulp,
                    # which moves a step by 2^-23 of itself (twice: r and c), plus an ulp of θ where the two
                    # subtractions round differently; carried over the steps as they come.
                    bound[i] += 2.0 ** -22 * (p - b).abs().max().item() + 2.0 ** -23 * b.abs().max().item()
                    # m and v see c·g: an ulp of c (two for v's (c g)²) and the roundings of two different values,
                    # at most 4 ulps of the step's largest moment
                    for key, acc in moment_bound[i].items():
                        moment_bound[i][key] = acc + 2.0 ** -21 * opt_p.state[p][key].abs().max().item()
            for i, (d, p) in enumerate(zip(sharded, plain)):
                gap = (d.full_tensor() - p.detach()).abs().max().item()
                assert gap <= bound[i], f"{backend}: param {i}: gap {gap:.3g} > bound {bound[i]:.3g}"
                for key, limit in moment_bound[i].items():
                    gap = (opt_s.state[d][key].full_tensor() - opt_p.state[p][key]).abs().max().item()
                    assert gap <= limit, f"{backend}: {key} of param {i}: gap {gap:.3g} > bound {limit:.3g}"
    finally:
        dist.destroy_process_group()


def test_lamb_on_params_sharded_across_two_ranks(tmp_path):
    """FSDP2 on two ranks (gloo, two processes): each rank holds shards of the params, and LAMB's trust ratios and
    global gradient norm need the whole tensors' sums of squares, which FusedLAMB adds over the ranks between its
    two passes (and before the clip). On every backend, the sharded run matches the same optimizer on the whole
    tensors within an ulp of r and c per step (derived in the worker); a rank that used its shard's own norms would
    be off by a large part of every step."""
    import torch.multiprocessing as mp
    if DEVICE.type != "cpu":
        pytest.skip("runs on CPU ranks (gloo)")
    backends = ("reference",) + fused_backends(rule="lamb")
    mp.spawn(_lamb_on_two_ranks, args=(str(tmp_path / "store"), backends), nprocs=2, join=True)


@pytest.mark.parametrize("backend", ("reference",) + fused_backends(rule="lamb"))
def test_lamb_refuses_a_partial_placement(mesh, backend):
    """A DTensor with a Partial placement holds addends, not elements: its norms cannot be formed from them."""
    from torch.distributed.tensor import DTensor, Partial
    whole = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    partial = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 5, device=DEVICE), mesh, [Partial()]))
    with pytest.raises(NotImplementedError, match=r"FusedLAMB: param 1 of param group 0 is a DTensor with a Partial "
                                                  r"placement"):
        fused_optim.FusedLAMB([whole, partial], backend=backend)
