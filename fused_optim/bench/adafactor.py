"""Adafactor benchmarks: providers and byte model.

    python -m fused_optim bench --optimizer adafactor

Providers: ``torch.optim.Adafactor`` (foreach) as "torch-adafactor", ``transformers.optimization.Adafactor``
as "transformers" (when transformers is installed), and the fused_optim providers, which need
``fused_optim.FusedAdafactor`` and report "unavailable" until it exists. All compute the same update:

    ρ_t = min(1e-2, 1/√t),  α_t = ρ_t · max(ε2, RMS(θ_{t-1})),  β̂_t = 1 - t^-0.8,
    V̂ = R Cᵀ / mean(R) (rank >= 2, R and C the EMAs of the row and column means of g²) or V = EMA of g² (rank 0/1),
    U = g / √V̂,  θ -= α_t · U / max(1, RMS(U) / 1)

without momentum and without weight decay. torch.optim.Adafactor has no switches for it: it always scales by
max(ε2, RMS(θ)) and takes ρ_t = min(lr, 1/√t); so it runs with lr = 1e-2, and transformers and fused_optim with
``relative_step=True, scale_parameter=True`` (ρ_t = min(1e-2, 1/√t), their relative step) and ``lr=None``.
(Until this was fixed the others ran ``scale_parameter=False, relative_step=False, lr=1e-2``: an update
1 / RMS(θ), about 50x, larger than torch's. The work hardly differed: the fused kernels read θ and sum θ² in
pass 1 whatever ``scale_parameter`` says, and transformers takes RMS(θ) every step either way.) What still differs:

* ε1 = 1e-30 everywhere, but transformers and fused_optim add it to g² before the means (R, C, V of g² + ε1),
  torch clamps mean(R) at ε1 and V̂ at ε1² (which is 0 in fp32) instead; both are no-ops in fp32 unless
  |g| < 6e-12 (g² + 1e-30 rounds to g² above that). torch's default ε1 (None: the dtype's machine epsilon,
  1.2e-7 in fp32, 7.8e-3 in bf16) would clamp √V̂ at it (|U| < 1 where the grads are that small, every element in
  bf16), so it is set explicitly. At g = 0 exactly, torch's rank-0/1 V̂ is 0 and its update 0 · inf = NaN; the
  others' is 0 (the benchmark's grads are never 0).
* The order of fp32 operations: torch forms R and C from ``norm(g)²``, V̂ = R Cᵀ / mean(R) and one rsqrt, with
  ``lerp`` for the EMAs; the others rsqrt(R / mean R) ⊗ rsqrt(C) and ``mul``/``add``. The updates agree to
  about 1e-5 relative (tests/test_bench.py steps the three on the same params).
* Weight decay (0 here) would differ: torch decays by lr · λ, the others by α_t · λ.

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


# ε1, ε2, the clipping threshold d and the decay exponent c: transformers' and fused_optim's defaults, given to
# all three (torch's default ε1 is not 1e-30: see the module docstring).
EPS = (1e-30, 1e-3)
CLIP_THRESHOLD = 1.0
DECAY_RATE = -0.8
# The relative step of transformers and fused_optim caps ρ_t at 1e-2, torch's at its lr: the same when lr = 1e-2.
assert LR == 1e-2


def _torch(params, case: Case):
    # lr is ρ_t's cap (min(lr, 1/√t)); α_t = ρ_t · max(ε2, RMS(θ)) always
    return torch.optim.Adafactor(params, lr=case.lr_arg(), beta2_decay=DECAY_RATE, eps=EPS, d=CLIP_THRESHOLD,
                                 weight_decay=0.0, foreach=True)


# transformers' and fused_optim's keywords for the same update: ρ_t = min(1e-2, 1/√t) (relative step, no lr),
# α_t = ρ_t · max(ε2, RMS(θ)) (parameter scaling).
_SAME_MATH = dict(lr=None, eps=EPS, clip_threshold=CLIP_THRESHOLD, decay_rate=DECAY_RATE, beta1=BETA1,
                  weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)


def _transformers(params, case: Case):
    try:
        from transformers.optimization import Adafactor
    except ImportError as exc:
        raise Unavailable(f"transformers is not installed ({exc})") from None
    return Adafactor(params, **_SAME_MATH)


_NO_GRAPH = "reads scalars to the host every step (.item()), so it cannot be captured"

SPECS = (
    OptimizerSpec(
        "adafactor", "FusedAdafactor", byte_model,
        (
            torch_provider("torch-adafactor", _torch, graph=False, graph_reason=_NO_GRAPH),
            torch_provider("transformers", _transformers, graph=False, graph_reason=_NO_GRAPH),
            *fused_providers("FusedAdafactor", lambda case: dict(_SAME_MATH)),
        ),
        "Adafactor without momentum, relative step min(1e-2, 1/sqrt(t)), scaled by max(1e-3, RMS(param))",
        lr=LR,
        shape_classes=(("rank >= 2", (2, 2)), ("rank 0/1", (2,))),
        baseline="torch-adafactor",  # not capturable: graph rows are compared with its eager step
    ),
)
