"""Triton kernels of fused_optim (imported as ``fused_optim.kernels``).

``engine.py`` is the one multi-tensor engine; each optimizer file holds its ``@triton.jit`` rule and a launcher.
``RULES`` maps a rule name to its launcher; a launcher's ``OPERANDS`` lists the tensor operands it reads from
the engine's tables, in order.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors (how CI tests them).
"""
from . import engine
from .adafactor import adafactor
from .adam import adam
from .lamb import grad_sq_norm, lamb

RULES = {"adam": adam, "lamb": lamb, "adafactor": adafactor}

__all__ = ["engine", "RULES", "grad_sq_norm"]
