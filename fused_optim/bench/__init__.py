"""Benchmarks of fused_optim's optimizer steps against torch.optim and others: ``python -m fused_optim bench``.

``harness.py`` is the one harness (workloads, dtype configurations, timing, byte models, output); each optimizer
module declares its providers and byte model as ``SPECS``. A new optimizer is one module here and one name in
``_MODULES``. ``main(argv)`` is the command line (``cli.py``); benchmarks/README.md says what each column means.
"""
from __future__ import annotations

import importlib

from .harness import OptimizerSpec

_MODULES = ("adamw", "lamb", "adafactor")

OPTIMIZERS: dict = {}
for _name in _MODULES:
    for _spec in importlib.import_module(f"{__name__}.{_name}").SPECS:
        OPTIMIZERS[_spec.name] = _spec


def main(argv: list | None = None) -> int:
    """``python -m fused_optim bench ARGS`` calls ``main(ARGS)``; returns the exit status."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main", "OPTIMIZERS", "OptimizerSpec"]
