"""Adafactor benchmarks: providers and byte model.

    python -m fused_optim bench --optimizer adafactor

Providers: ``torch.optim.Adafactor`` (foreach) as "torch-adafactor", ``transformers.optimization.Adafactor``
as "transformers" (when transformers is installed), and the fused_optim providers, which need
``fused_optim.FusedAdafactor`` and report "unavailable" until it exists. All run Adafactor without momentum
(beta1 = None), a fixed lr of 1e-2, no relative step and no parameter scaling (torch.optim's defaults).
Neither torch's nor transformers' step can be captured in a CUDA graph: both read scalars to the host every step.

Byte model (per parameter, one step), the passes of kernels/adafactor.py and of the native kernels
(csrc/adafactor_rule.h), which read and write the same operands. A tensor of rank >= 2 is factored: its second
moment is O(rows + columns) and left out; pass 1 reads g and θ (row/column statistics, Σθ²), pass 2 reads g (RMS of
the update), pass 3 reads g and θ and writes θ. A tensor of rank 0 or 1 keeps a full-size second moment V (state
dtype): pass 1 reads θ only (Σθ²), pass 2 reads g and V and writes V, pass 3 reads g, V and θ and writes θ:

    rank >= 2
    fp32          pass 1: read g4 p4 | pass 2: read g4 | pass 3: read g4 p4; write p4                    = 24
    bf16-master   pass 1: read g2 master4 | pass 2: read g2 | pass 3: read g2 master4; write master4 p2   = 20
    bf16          pass 1: read g2 p2 | pass 2: read g2 | pass 3: read g2 p2; write p2                    = 12
    rank 0/1
    fp32          pass 1: read p4 | pass 2: read g4 V4; write V4 | pass 3: read g4 V4 p4; write p4        = 32
    bf16-master   pass 1: read master4 | pass 2: read g2 V4; write V4
                  | pass 3: read g2 V4 master4; write master4 p2                                         = 30
    bf16          pass 1: read p2 | pass 2: read g2 V2; write V2 | pass 3: read g2 V2 p2; write p2        = 16

With momentum (``BETA1`` not None) pass 3 also reads and writes m (state dtype): +8 in fp32. A workload's
bytes_per_param is these weighted by the tensors' sizes (harness.workload_bytes): many-small, 1-D only, is 32 in
fp32; GPT-2 small, whose biases and norms are 0.1% of its params, 24.008.
"""
from __future__ import annotations

import torch

from .harness import ByteModel, Case, OptimizerSpec, Unavailable, fused_providers, torch_provider

LR = 1e-2
BETA1 = None  # no momentum (torch.optim.Adafactor has none)


def byte_model(cfg, shape=None) -> ByteModel:
    """The bytes one step moves per element of a tensor of ``shape`` (None: a factored one); see the module
    docstring."""
    p, s = cfg.param_bytes, cfg.state_bytes
    theta = ("master", 4) if cfg.master else ("p", p)
    write_theta = (("master", 4), ("p", p)) if cfg.master else (("p", p),)
    momentum = (("m", s),) if BETA1 is not None else ()
    if shape is None or len(shape) >= 2:  # factored: R and C are O(rows + columns)
        return ByteModel((
            ((("g", p), theta), ()),
            ((("g", p),), ()),
            ((("g", p), theta, *momentum), (*momentum, *write_theta)),
        ))
    return ByteModel((  # rank 0/1: a full V, updated in pass 2 and read again in pass 3
        ((theta,), ()),
        ((("g", p), ("V", s)), (("V", s),)),
        ((("g", p), ("V", s), theta, *momentum), (*momentum, *write_theta)),
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
_SAME_MATH = dict(relative_step=False, scale_parameter=False, warmup_init=False, beta1=BETA1, weight_decay=0.0)

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
        shape_classes=(("rank >= 2", (2, 2)), ("rank 0/1", (2,))),
    ),
)
