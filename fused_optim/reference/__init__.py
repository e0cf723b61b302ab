"""The reference path: the spec every fused backend is tested against.

Readable per-tensor PyTorch, one function per optimizer, written in the symbols of the algorithm box in the
optimizer class's docstring. It favours clarity over speed: it may read scalars to the host (``float(step)``),
loops over tensors in Python, and computes in fp32 for bf16/fp16 params (fp64 for fp64 params).
"""
from .adafactor import adafactor
from .adam import adam
from .lamb import grad_sq_norm, lamb

# rule name -> per-tensor reference function; the dispatcher looks rules up here.
RULES = {"adam": adam, "lamb": lamb, "adafactor": adafactor}

__all__ = ["adam", "lamb", "adafactor", "grad_sq_norm", "RULES"]
