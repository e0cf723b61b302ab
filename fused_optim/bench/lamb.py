"""LAMB benchmarks: providers and byte model.

    python -m fused_optim bench --optimizer lamb

torch.optim has no LAMB, so the unfused baseline ("torch-ops") is LAMB written with torch foreach ops below
(:class:`ForeachLAMB`); the fused_optim providers run ``fused_optim.FusedLAMB`` on triton and native.

Byte model (per parameter, one step): pass 1 reads θ, g, m, v and writes m, v, with the per-tensor norms of θ and
of the update as by-products; pass 2 re-reads θ, m, v to recompute the update and writes θ:

    fp32          pass 1: read p4 g4 m4 v4; write m4 v4 | pass 2: read p4 m4 v4; write p4        = 40
    bf16-master   pass 1: read master4 g2 m4 v4; write m4 v4 | pass 2: read master4 m4 v4; write master4 p2 = 40
    bf16          pass 1: read p2 g2 m2 v2; write m2 v2 | pass 2: read p2 m2 v2; write p2        = 20
"""
from __future__ import annotations

import torch

from .harness import ByteModel, Case, OptimizerSpec, fused_providers, torch_provider

HYPERPARAMETERS = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def byte_model(cfg, shape=None) -> ByteModel:  # the same for every shape
    p, s = cfg.param_bytes, cfg.state_bytes
    theta = ("master", 4) if cfg.master else ("p", p)
    write_theta = (("master", 4), ("p", p)) if cfg.master else (("p", p),)
    return ByteModel((
        ((theta, ("g", p), ("m", s), ("v", s)), (("m", s), ("v", s))),
        ((theta, ("m", s), ("v", s)), write_theta),
    ))


class ForeachLAMB(torch.optim.Optimizer):
    r"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", 2020,
    Algorithm 2) with torch foreach ops: the unfused baseline of the benchmarks, not part of the library.

    Per tensor, with step t:

    .. math::
        m \leftarrow \mathrm{lerp}(m, g, 1-\beta_1), \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        r = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} + \lambda\theta, \quad
        \theta \leftarrow \theta - \gamma \, \frac{\lVert\theta\rVert}{\lVert r\rVert} \, r

    with the trust ratio taken as 1 when either norm is 0. Every scalar stays on the device (steps, bias
    corrections, norms, trust ratios, a tensor lr), so the step can be captured in a CUDA graph.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                state = self.state[p]
                if not state:
                    # fp64: 1 - beta2**t in fp32 loses ~5 digits to cancellation (beta2 = 0.999 is off by 6e-8
                    # in fp32, 1 - beta2 = 1e-3 then by 6e-5); the counters are 0-d, their width costs nothing
                    state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
            steps = [self.state[p]["step"] for p in params]
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]

            torch._foreach_add_(steps, 1.0)
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)

            # 1 - beta**t, one 0-d tensor per param
            bc1 = torch._foreach_pow(beta1, steps)
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1.0)
            bc2 = torch._foreach_pow(beta2, steps)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1.0)

            denom = torch._foreach_div(vs, bc2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(ms, bc1)
            torch._foreach_div_(update, denom)
            del denom
            if wd != 0:
                torch._foreach_add_(update, params, alpha=wd)

            w_norm = torch.stack(torch._foreach_norm(params))
            u_norm = torch.stack(torch._foreach_norm(update))
            trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            torch._foreach_mul_(update, list((trust * lr).unbind()))
            torch._foreach_sub_(params, update)
        return loss


def _make(params, case: Case):
    return ForeachLAMB(params, lr=case.lr_arg(), **HYPERPARAMETERS)


SPECS = (
    OptimizerSpec(
        "lamb", "FusedLAMB", byte_model,
        (
            torch_provider("torch-ops", _make),
            *fused_providers("FusedLAMB", lambda case: dict(HYPERPARAMETERS)),
        ),
        "LAMB with bias correction, weight decay 0.01",
        baseline="torch-ops",  # torch.optim has no LAMB
    ),
)
