"""Adafactor benchmarks: providers and byte model.

    python -m fused_optim bench --optimizer adafactor

Providers: ``torch.optim.Adafactor`` (foreach) as "torch-adafactor", ``transformers.optimization.Adafactor``
as "transformers" (when transformers is installed), and the fused_optim providers, which need
``fused_optim.FusedAdafactor`` and report "unavailable" until it exists. All run Adafactor without momentum
(beta1 = None), a fixed lr of 1e-2, no relative step and no parameter scaling (torch.optim's defaults).
Neither torch's nor transformers' step can be captured in a CUDA graph: both read scalars to the host every step.

Byte model (per parameter, one step; the factored second moment is O(rows + columns) and left out), the passes of
kernels/adafactor.py: three reads of g (row/column statistics with Σθ², RMS of the update, the update), two reads
of θ (RMS(θ) in pass 1, the update), one write of θ:

    fp32          pass 1: read g4 p4 | pass 2: read g4 | pass 3: read g4 p4; write p4                  = 24
    bf16-master   pass 1: read g2 master4 | pass 2: read g2 | pass 3: read g2 master4; write master4 p2 = 20
    bf16          pass 1: read g2 p2 | pass 2: read g2 | pass 3: read g2 p2; write p2                  = 12
"""
from __future__ import annotations

import torch

from .harness import ByteModel, Case, OptimizerSpec, Unavailable, fused_providers, torch_provider

LR = 1e-2


def byte_model(cfg) -> ByteModel:
    p = cfg.param_bytes
    theta = ("master", 4) if cfg.master else ("p", p)
    write_theta = (("master", 4), ("p", p)) if cfg.master else (("p", p),)
    return ByteModel((
        ((("g", p), theta), ()),
        ((("g", p),), ()),
        ((("g", p), theta), write_theta),
    ))


def _torch(params, case: Case):
    return torch.optim.Adafactor(params, lr=case.lr_arg(), foreach=True)


def _transformers(params, case: Case):
    try:
        from transformers.optimization import Adafactor
    except ImportError as exc:
        raise Unavailable(f"transformers is not installed ({exc})") from None
    return Adafactor(params, lr=case.lr, **_SAME_MATH)


# The configuration every provider runs (torch.optim.Adafactor's defaults: a fixed lr, no parameter scaling).
_SAME_MATH = dict(relative_step=False, scale_parameter=False, warmup_init=False, beta1=None, weight_decay=0.0)

_NO_GRAPH = "reads scalars to the host every step (.item()), so it cannot be captured"

SPECS = (
    OptimizerSpec(
        "adafactor", "FusedAdafactor", byte_model,
        (
            torch_provider("torch-adafactor", _torch, graph=False, graph_reason=_NO_GRAPH),
            torch_provider("transformers", _transformers, graph=False, graph_reason=_NO_GRAPH),
            *fused_providers("FusedAdafactor", lambda case: _SAME_MATH),
        ),
        "Adafactor without momentum, lr 1e-2",
        lr=LR,
    ),
)
