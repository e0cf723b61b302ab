"""Adam and AdamW benchmarks: providers and byte model.

    python -m fused_optim bench --optimizer adamw            # or adam; see benchmarks/README.md

Byte model (per parameter, one step; the floor a single fused pass can reach):

    fp32          read p4 g4 m4 v4;            write p4 m4 v4          = 28
    bf16-master   read master4 g2 m4 v4;       write master4 p2 m4 v4  = 28   (the bf16 param is only written)
    bf16          read p2 g2 m2 v2;            write p2 m2 v2          = 14

torch.optim providers: AdamW with ``foreach=False`` (for-loop), ``foreach=True``, ``fused=True``, and the foreach
step under ``torch.compile``. For bf16-master they run on fp32 copies of the params (see
:func:`harness.torch_provider`): 40 B/param instead of the model's 28, which their ``bw_fraction`` shows.
"""
from __future__ import annotations

import torch

from .harness import ByteModel, Case, OptimizerSpec, fused_providers, torch_provider

HYPERPARAMETERS = dict(betas=(0.9, 0.999), eps=1e-8)
WEIGHT_DECAY = {"adamw": 0.1, "adam": 0.0}


def byte_model(cfg, shape=None) -> ByteModel:  # the same for every shape
    p, s = cfg.param_bytes, cfg.state_bytes
    if cfg.master:  # the update runs on the fp32 master; the bf16 param is only written
        reads = (("master", 4), ("g", p), ("m", s), ("v", s))
        writes = (("master", 4), ("p", p), ("m", s), ("v", s))
    else:
        reads = (("p", p), ("g", p), ("m", s), ("v", s))
        writes = (("p", p), ("m", s), ("v", s))
    return ByteModel(((reads, writes),))


def _torch_maker(cls, **flags):
    def make(params, case: Case):
        return cls(params, lr=case.lr_arg(), weight_decay=WEIGHT_DECAY[cls.__name__.lower()],
                   capturable=case.capturable, **HYPERPARAMETERS, **flags)

    return make


def _providers(torch_cls, fused_cls: str) -> tuple:
    return (
        torch_provider("torch-forloop", _torch_maker(torch_cls, foreach=False, fused=False), per_tensor_copy=True),
        torch_provider("torch-foreach", _torch_maker(torch_cls, foreach=True)),
        torch_provider("torch-fused", _torch_maker(torch_cls, fused=True)),
        # The foreach step compiled by inductor, as in PyTorch's "Compiling the optimizer" recipe. Not captured
        # (torch.compile(mode="reduce-overhead") is how inductor does CUDA graphs), and not rotated: every copy
        # would be a recompile, so the harness flushes the cache before its steps instead. Not in the CPU default
        # sweep: inductor compiles for minutes on a small CPU (95 s for GPT-2's 148 tensors on 2 busy cores).
        torch_provider("torch-compile", _torch_maker(torch_cls, foreach=True), compile=True, graph=False,
                       graph_reason="inductor captures CUDA graphs itself (mode='reduce-overhead'); not benchmarked",
                       rotate=False, default_devices=("cuda",)),
        *fused_providers(fused_cls, lambda case: {"weight_decay": WEIGHT_DECAY[torch_cls.__name__.lower()],
                                             **HYPERPARAMETERS}),
    )


SPECS = (
    OptimizerSpec("adamw", "FusedAdamW", byte_model, _providers(torch.optim.AdamW, "FusedAdamW"),
                  "AdamW, weight decay 0.1"),
    OptimizerSpec("adam", "FusedAdam", byte_model, _providers(torch.optim.Adam, "FusedAdam"),
                  "Adam, no weight decay (the AdamW kernel with one flag: not in the default sweep)", default=False),
)
