"""The native backend's Python side: loading the extension, saying why it cannot run, and its launchers.

The extension (``csrc/``) registers operators with the PyTorch dispatcher (``torch.ops.fused_optim.adam_``, schema
in csrc/ops.cpp) with CPU kernels and, when built with CUDA, CUDA kernels. It comes from one of two places:

1. ``fused_optim._C``, built by ``pip install --no-build-isolation [-e] .`` (setup.py);
2. otherwise a JIT build of the same sources with ninja through :func:`torch.utils.cpp_extension.load` on first
   use, cached in ``$TORCH_EXTENSIONS_DIR/fused_optim_C`` or ``~/.cache/fused_optim/<torch version>/`` (a
   rebuild happens only when a source changes). ``FUSED_OPTIM_NO_JIT=1`` turns the JIT build off.

:func:`load` returns the module or raises :class:`NativeUnavailable` with the reason (remembered: a failed build
is not retried in the same process); :func:`unusable_reason` is what ``backends.native_unusable`` reports.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import threading

import torch
from torch import Tensor

from . import _build

JIT_NAME = "fused_optim_C"


class NativeUnavailable(RuntimeError):
    """The native extension can neither be imported nor built; the message says why."""


_lock = threading.Lock()
_module = None
_origin = ""  # "prebuilt: <path>" or "jit: <path>"
_error: str | None = None
_reasons: dict = {}  # device type -> reason or None (unusable_reason is called for every param of every step)


def _summarize(text: str, limit: int = 1200) -> str:
    """The compiler's error lines (or the tail of its output), short enough for one message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b|Error|fatal", ln)]
    picked = errors[:6] if errors else lines[-6:]
    out = " | ".join(picked)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _cache_dir() -> str:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], JIT_NAME)
    tag = f"torch{torch.__version__}".replace("+", "_")
    return os.path.join(os.path.expanduser("~"), ".cache", "fused_optim", tag)


def _jit_build():
    """Build csrc/ with ninja and import it; raises NativeUnavailable with the reason."""
    from torch.utils import cpp_extension

    csrc = _build.csrc_dir()
    if csrc is None:
        raise NativeUnavailable("the C++ sources (csrc/) are not part of this installation")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable("ninja is not installed (`pip install ninja`)")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = [os.path.join(csrc, s) for s in _build.CPU_SOURCES]
    cflags = list(_build.CXX_FLAGS)
    cuda_flags = None
    if with_cuda:
        sources += [os.path.join(csrc, s) for s in _build.CUDA_SOURCES]
        cflags += _build.CUDA_DEFINES
        cuda_flags = list(_build.NVCC_FLAGS) + _build.CUDA_DEFINES
    build_dir = _cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    try:
        return cpp_extension.load(
            name=JIT_NAME, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
            extra_ldflags=list(_build.LD_FLAGS), extra_include_paths=[csrc], build_directory=build_dir,
            with_cuda=with_cuda, verbose=False,
        ), build_dir
    except Exception as exc:  # compile or link errors (RuntimeError with the compiler output), import errors
        raise NativeUnavailable(f"the JIT build in {build_dir} failed: {type(exc).__name__}: "
                                f"{_summarize(str(exc))}") from exc


def load():
    """The native extension module: ``fused_optim._C`` if it was built, else a JIT build (see the module
    docstring). Raises :class:`NativeUnavailable` saying why neither works."""
    global _module, _origin, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise NativeUnavailable(_error)
        try:
            _module = importlib.import_module("fused_optim._C")
            _origin = f"prebuilt: {_module.__file__}"
            return _module
        except ImportError as exc:
            prebuilt = ("fused_optim._C is not built" if isinstance(exc, ModuleNotFoundError)
                        and exc.name == "fused_optim._C" else f"fused_optim._C does not import ({exc})")
        if os.environ.get("FUSED_OPTIM_NO_JIT", "0") == "1":
            _error = (f"{prebuilt}, and FUSED_OPTIM_NO_JIT=1 turns the JIT build off; build it with "
                      "`pip install --no-build-isolation -e .` (needs a C++ compiler)")
            raise NativeUnavailable(_error)
        try:
            _module, build_dir = _jit_build()
            _origin = f"jit: {build_dir}"
            return _module
        except NativeUnavailable as exc:
            _error = (f"{prebuilt}, and {exc}; build it with `pip install --no-build-isolation -e .` "
                      "(needs a C++ compiler, and nvcc with a CUDA build of torch for CUDA kernels)")
            raise NativeUnavailable(_error) from exc


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (asks the dispatcher)."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_optim::adam_", "CUDA")


def unusable_reason(device: torch.device) -> str | None:
    """Why the native backend cannot run on ``device``, or None if it can. The first call may JIT-build."""
    kind = device.type
    if kind in _reasons:
        return _reasons[kind]
    if kind not in ("cpu", "cuda"):
        why = f"the native backend runs CPU and CUDA tensors, not {kind!r} ones"
    else:
        try:
            load()
            why = None
            if kind == "cuda" and not has_cuda_kernels():
                why = ("fused_optim._C was built without CUDA kernels (CPU-only torch or no nvcc at build time); "
                       "reinstall with a CUDA build of torch and nvcc on PATH: "
                       "`pip install --no-build-isolation -e .`")
        except NativeUnavailable as exc:
            why = str(exc)
    _reasons[kind] = why
    return why


def info() -> str:
    """Where the loaded extension comes from and what it contains (``python -m fused_optim info``)."""
    try:
        load()
    except NativeUnavailable as exc:
        return f"not available: {exc}"
    return f"{torch.ops.fused_optim.build_info()} ({_origin})"


# ----------------------------------------------------------------------------------------------------------------
# Launchers: one per rule, called by backends._run_native with the bucket's table (fused_optim/tables.py) and
# operand lists. The lists go to the dispatcher (mutation and device); the kernels read the table.
# ----------------------------------------------------------------------------------------------------------------
ADAM_OPERANDS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param", "step")


def _present(operands: dict, name: str, needed: bool) -> list:
    """The list of an optional operand when the launch uses it, else []; a launch group must be uniform."""
    tensors = operands[name]
    if not needed:
        return []
    if any(t is None for t in tensors):
        i = next(i for i, t in enumerate(tensors) if t is None)
        raise RuntimeError(f"fused_optim: tensor {i} of a launch group has no {name!r} state while others do; "
                           f"re-create the optimizer state (or load a state_dict that has {name!r} for every param)")
    return tensors


def adam(table, operands: dict, hp: dict, *, grad_scale=None, found_inf=None) -> None:
    """One launch of ``fused_optim::adam_`` over every tensor of ``table`` (operands as in ``ADAM_OPERANDS``).

    ``hp``: lr (float or a 0-d tensor on the params' device), beta1, beta2, eps, weight_decay, amsgrad, maximize,
    decoupled_weight_decay. ``grad_scale``/``found_inf``: GradScaler's tensors on the params' device, or None.
    """
    load()
    lr = hp["lr"]
    lr_tensor = lr if isinstance(lr, Tensor) else None
    amsgrad = bool(hp["amsgrad"])
    master = operands["master_param"][0] is not None
    torch.ops.fused_optim.adam_(
        operands["param"], operands["grad"], operands["exp_avg"], operands["exp_avg_sq"],
        _present(operands, "max_exp_avg_sq", amsgrad), _present(operands, "master_param", master), operands["step"],
        [table.ptrs[name] for name in ADAM_OPERANDS], table.numels, table.block_tensor, table.block_start,
        table.arrivals, table.block,
        0.0 if lr_tensor is not None else float(lr), lr_tensor,
        float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]), float(hp["weight_decay"]),
        amsgrad, bool(hp["maximize"]), bool(hp["decoupled_weight_decay"]),
        grad_scale, found_inf,
    )


adam.OPERANDS = ADAM_OPERANDS

RULES = {"adam": adam}
