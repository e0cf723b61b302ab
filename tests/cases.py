"""The one table that drives the parity tests: optimizers x backends x dtypes, and the option variants of each
optimizer. Add an optimizer or a backend here and every parity, edge-case and interop test picks it up."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fused_optim
from fused_optim import backends

from conftest import DEVICE


@dataclass(frozen=True)
class OptimizerCase:
    name: str
    cls: type
    torch_cls: type | None  # torch.optim counterpart (state_dict interop), or None
    state_keys: tuple  # per-element state compared in parity tests (besides step and master_param)
    variants: tuple = field(default_factory=tuple)  # kwargs dicts, each one parity configuration
    lr: float = 1e-2  # large enough that 20 steps move params by many ulps


OPTIMIZERS = {
    "adam": OptimizerCase(
        "adam", fused_optim.FusedAdam, torch.optim.Adam, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        variants=(
            dict(),
            dict(weight_decay=0.1),  # L2
            dict(amsgrad=True, weight_decay=0.05, betas=(0.8, 0.95)),
            dict(maximize=True, eps=1e-6),
            dict(betas=(0.3, 0.5)),  # beta1 < 0.5: the other branch of lerp
        ),
    ),
    "adamw": OptimizerCase(
        "adamw", fused_optim.FusedAdamW, torch.optim.AdamW, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        variants=(
            dict(),
            dict(weight_decay=0.3, amsgrad=True),
            dict(maximize=True, weight_decay=0.0),
        ),
    ),
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_backends(device: torch.device = DEVICE, rule: str = "adam") -> tuple:
    """The fused backends usable on this machine's test device for update rule ``rule`` (the reference is the
    oracle, not a case)."""
    return tuple(b for b in ("triton", "native") if backends.unusable_for(b, device, rule) is None)


def parity_cases():
    """(optimizer, backend, dtype) for every usable fused backend."""
    return [(o, b, d) for o in OPTIMIZERS for b in fused_backends() for d in DTYPES]


def case_id(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)
