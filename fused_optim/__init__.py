"""fused_optim: fused multi-tensor optimizers for PyTorch, with a pure-PyTorch reference path as the spec.

    from fused_optim import FusedAdamW
    opt = FusedAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)   # drop-in for torch.optim.AdamW

``python -m fused_optim info | check | bench``: usable backends, parity against the reference, timings.
"""
from .adafactor import FusedAdafactor
from .adam import FusedAdam, FusedAdamW
from .backends import BackendUnavailable
from .lamb import FusedLAMB

__version__ = "0.1.0"

__all__ = ["FusedAdam", "FusedAdamW", "FusedLAMB", "FusedAdafactor", "BackendUnavailable", "__version__"]
