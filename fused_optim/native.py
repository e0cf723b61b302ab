"""The native backend's Python side: loading the extension, saying why it cannot run, and its launchers.

The extension (``csrc/``) registers operators with the PyTorch dispatcher (``torch.ops.fused_optim.adam_``, schema
in csrc/ops.cpp; ``lamb_``, ``grad_sq_`` and ``segment_sum``, csrc/ops_lamb.cpp; Adafactor's ``adafactor_pass1_`` ..
``adafactor_pass3_`` and ``segment_sums_``, csrc/adafactor_ops.cpp) with CPU kernels and, when built with CUDA, CUDA
kernels, and has one Python function, ``plan_match`` (csrc/plan.cpp: the optimizer's step-plan check, see
:func:`plan_match`). It comes from one of two places:

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
from itertools import repeat
from operator import is_not

import torch
from torch import Tensor

from . import _build
from .tables import TILE_META_FIELDS, TileTable

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


_prebuilt_tried = False


def plan_match():
    """The extension's ``plan_match`` (csrc/plan.cpp, the step plan's per-tensor check) when the extension is
    loaded or was built ahead of time, else None. Never JIT-builds: the optimizer asks at every planned step."""
    global _module, _origin, _prebuilt_tried
    if _module is None and not _prebuilt_tried and _error is None:
        with _lock:
            _prebuilt_tried = True
            if _module is None:
                try:
                    _module = importlib.import_module("fused_optim._C")
                    _origin = f"prebuilt: {_module.__file__}"
                except ImportError:
                    return None
    return None if _module is None else _module.plan_match


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
LAUNCHES = {"count": 0}  # kernel launches (one per op call), counted by tests as kernels.engine.LAUNCHES is


def _launch(op, *args) -> None:
    LAUNCHES["count"] += 1
    op(*args)


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


def _lists_or_dtypes(operands: dict, names: tuple, present: dict, tables_only) -> tuple:
    """The tensor lists of an ``adam_`` / ``lamb_`` launch (``names``; ``present``: name -> whether the launch uses
    that optional state) and the trailing ``param_dtype, grad_dtype, master`` arguments. ``tables_only``: None, or
    ``(param_dtype, grad_dtype, master)`` when the caller (the optimizer's step plan) has checked this step that
    every tensor has the dtype, contiguity, size and address the table holds: then ``operands`` is not read, the
    lists go empty and the dtypes are stated instead (csrc/ops_common.h, TablesOnly): 1,000-tensor lists cost
    about 0.1 us per tensor to build and as much again to pass to an operator."""
    if tables_only is not None:
        return tuple([] for _ in names) + tuple(tables_only)
    lists = tuple(_present(operands, name, present[name]) if name in present else operands[name] for name in names)
    return lists + (None, None, False)


def adam(table, operands, hp: dict, *, grad_scale=None, found_inf=None, tables_only=None) -> None:
    """One launch of ``fused_optim::adam_`` over every tensor of ``table`` (operands as in ``ADAM_OPERANDS``).

    ``hp``: lr (float or a 0-d tensor on the params' device), beta1, beta2, eps, weight_decay, amsgrad, maximize,
    decoupled_weight_decay. ``grad_scale``/``found_inf``: GradScaler's tensors on the params' device, or None.
    ``tables_only``: see ``_lists_or_dtypes``.
    """
    load()
    lr = hp["lr"]
    lr_tensor = lr if isinstance(lr, Tensor) else None
    amsgrad = bool(hp["amsgrad"])
    present = None if tables_only is not None else {
        "max_exp_avg_sq": amsgrad, "master_param": operands["master_param"][0] is not None}
    *lists, param_dtype, grad_dtype, master = _lists_or_dtypes(operands, ADAM_OPERANDS, present, tables_only)
    _launch(
        torch.ops.fused_optim.adam_, *lists,
        [table.ptrs[name] for name in ADAM_OPERANDS], table.numels, table.block_tensor, table.block_start,
        table.arrivals, table.block,
        0.0 if lr_tensor is not None else float(lr), lr_tensor,
        float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]), float(hp["weight_decay"]),
        amsgrad, bool(hp["maximize"]), bool(hp["decoupled_weight_decay"]),
        grad_scale, found_inf, param_dtype, grad_dtype, master,
    )


adam.OPERANDS = ADAM_OPERANDS
adam.TABLES_ONLY = True  # takes tables_only (a launch checked by the step plan)

LAMB_OPERANDS = ("param", "grad", "exp_avg", "exp_avg_sq", "master_param", "step")  # = kernels/lamb.py OPERANDS
LAMB_NORMS, LAMB_APPLY, LAMB_FUSED = 0, 1, 2  # the passes of csrc/lamb_rule.h


def lamb(table, operands, hp: dict, *, grad_scale=None, found_inf=None, tables_only=None) -> None:
    """One LAMB step over every tensor of ``table`` (operands as in ``LAMB_OPERANDS``), as kernels/lamb.py does it:
    pass 1 (moments, per-block float64 partial sums of θ² and u²), ``segment_sum`` (per-tensor sums of squares, a
    separate step: under FSDP2 ``hp["reduce_sums"]`` all-reduces ``sums`` over the shard groups there), pass 2
    (θ -= γ r u); or one fused pass for a group without layer adaptation. 3 (or 1) launches, whatever the number of
    tensors.

    ``hp``: lr (float or a 0-d tensor on the params' device), beta1, beta2, eps, weight_decay, bias_correction,
    trust_clip (None or (lo, hi)), layer_adaptation, grad_clip (None, or c = min(1, max_grad_norm / G) as a 0-d
    float64 or float32 tensor on the params' device). ``grad_scale``/``found_inf``: GradScaler's tensors, or None.
    ``tables_only``: see ``_lists_or_dtypes``. ``hp["reduce_sums"]`` (optional): as kernels/lamb.py's.
    """
    load()
    lr = hp["lr"]
    lr_tensor = lr if isinstance(lr, Tensor) else None
    clip = hp["trust_clip"]
    op = torch.ops.fused_optim.lamb_
    present = None if tables_only is not None else {"master_param": operands["master_param"][0] is not None}
    *lists, param_dtype, grad_dtype, master = _lists_or_dtypes(operands, LAMB_OPERANDS, present, tables_only)
    head = (*lists, [table.ptrs[name] for name in LAMB_OPERANDS], table.numels, table.block_tensor,
            table.block_start, table.arrivals, table.block)
    scalars = (0.0 if lr_tensor is not None else float(lr), lr_tensor,
               float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]), float(hp["weight_decay"]),
               bool(hp["bias_correction"]), clip is not None,
               0.0 if clip is None else float(clip[0]), 0.0 if clip is None else float(clip[1]), hp.get("grad_clip"))
    tail = (param_dtype, grad_dtype, master)
    if not hp["layer_adaptation"]:
        _launch(op, *head, LAMB_FUSED, *scalars, None, None, grad_scale, found_inf, *tail)
        return
    partials = torch.empty((2, table.n_blocks), dtype=torch.float64, device=table.numels.device)
    _launch(op, *head, LAMB_NORMS, *scalars, partials, None, grad_scale, found_inf, *tail)
    # Per tensor: sums[0, i] = ||θ_i||², sums[1, i] = ||u_i||² (fixed order: deterministic; sums add across shards).
    sums = segment_sum(partials, table.first_block)
    if hp.get("reduce_sums") is not None:
        hp["reduce_sums"](sums)  # FSDP2: the other ranks' shards of each tensor
    _launch(op, *head, LAMB_APPLY, *scalars, None, sums, None, found_inf, *tail)


lamb.OPERANDS = LAMB_OPERANDS
lamb.TABLES_ONLY = True


def segment_sum(partials: Tensor, seg_start: Tensor) -> Tensor:
    """``out[q, s]`` = the sum of ``partials[q, seg_start[s]:seg_start[s + 1]]`` (float64 [Q, P]; int32/int64
    [S + 1]), as a new float64 [Q, S] tensor: one launch, a fixed order (csrc/engine.h), the same bits on CPU and
    CUDA."""
    load()
    LAUNCHES["count"] += 1
    return torch.ops.fused_optim.segment_sum(partials, seg_start)


def grad_sq_norm(table, grads: list | None, *, grad_scale=None, found_inf=None, grad_dtype=None,
                 per_tensor: bool = False) -> Tensor:
    """Σ g² over every grad of ``table`` (``grads``: the tensors of its ``grad`` operand; each divided by
    ``grad_scale`` first, as pass 1 of ``lamb`` divides it), a 0-d float64 tensor on their device (squares and sums
    in float64): the per-block partials, then one segment over all of them. Two launches, no host synchronization,
    deterministic; 0 when ``found_inf`` is set (the step is skipped). ``grad_dtype`` instead of ``grads``: a
    table-only launch, for a caller (the optimizer's step plan) that checked the grads against the table this
    step. ``per_tensor``: one sum per tensor, float64 ``[n_tensors]``."""
    load()
    partials = torch.empty((1, table.n_blocks), dtype=torch.float64, device=table.numels.device)
    _launch(torch.ops.fused_optim.grad_sq_, [] if grads is None else grads, table.ptrs["grad"], table.numels,
            table.block_tensor, table.block_start, table.arrivals, table.block, grad_scale, found_inf, partials,
            grad_dtype)
    if per_tensor:
        return segment_sum(partials, table.first_block)[0]
    whole = table.first_block[:: table.n_tensors].contiguous()  # [0, n_blocks]: one segment over every block
    return segment_sum(partials, whole)[0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Adafactor: seven launches per bucket on the 2-D tile map (fused_optim.tables.TileTable, the Triton engine's), in
# the order of kernels/adafactor.py; the schemas and what each operator does are in csrc/adafactor_ops.cpp.
# ----------------------------------------------------------------------------------------------------------------
ADAFACTOR_OPERANDS = ("param", "grad", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg", "master_param",
                      "step")
_tile_layout_checked = False


def _check_tile_layout() -> None:
    """The engines read TileTable.meta by position (csrc/tile_map.h): the extension must agree with tables.py."""
    global _tile_layout_checked
    if not _tile_layout_checked:
        fields = tuple(torch.ops.fused_optim.tile_meta_fields())
        if fields != TILE_META_FIELDS:
            raise NativeUnavailable(f"the native extension reads tile tables with the fields {fields}, but "
                                    f"fused_optim.tables lays them out as {TILE_META_FIELDS}; rebuild the extension "
                                    "(`pip install --no-build-isolation -e .`)")
        _tile_layout_checked = True


def _compact(operands: dict, name: str, index: tuple) -> list:
    """The ``name`` states of the params at ``index`` (the table's ``matrices`` for exp_avg_sq_row/col, its
    ``flats`` for exp_avg_sq), in param order: the ops take these states as compact lists (a zero-size param has
    none to update)."""
    tensors = operands[name]
    out = list(map(tensors.__getitem__, index))
    if not all(map(is_not, out, repeat(None))):
        i = index[next(k for k, t in enumerate(out) if t is None)]
        raise RuntimeError(f"fused_optim: tensor {i} of a launch group has no {name!r} state; re-create the optimizer "
                           f"state (or load a state_dict that has {name!r} for every param of that rank)")
    return out


def adafactor(table: TileTable, operands: dict, hp: dict, *, grad_scale=None, found_inf=None,
              tables_only=None) -> None:
    """One Adafactor step over every tensor of ``table`` (operands as in ``ADAFACTOR_OPERANDS``): seven operator
    calls whatever the number of tensors (five without any matrix), each reduction a call of its own.

    ``hp``: lr (None with relative_step; else a float or a 0-d tensor on the params' device), eps1, eps2,
    clip_threshold, decay_rate, beta1 (None: no momentum), weight_decay, scale_parameter, relative_step,
    warmup_init. ``grad_scale``/``found_inf``: GradScaler's tensors on the params' device, or None.
    ``tables_only``: None, or ``(param_dtype, grad_dtype, master)`` for a step the optimizer's step plan checked
    (``_lists_or_dtypes``): then ``operands`` is not read and every operator gets its lists empty.
    """
    load()
    _check_tile_layout()
    ops = torch.ops.fused_optim
    work = table.scratch()
    tables = [table.ptrs[name] for name in ADAFACTOR_OPERANDS]
    if tables_only is not None:
        params = grads = steps = masters = exp_avgs = rows = cols = sqs = []
        param_dtype, grad_dtype, master = tables_only
    else:
        params, grads, steps = operands["param"], operands["grad"], operands["step"]
        masters = _present(operands, "master_param", operands["master_param"][0] is not None)
        exp_avgs = _present(operands, "exp_avg", hp["beta1"] is not None)
        rows = _compact(operands, "exp_avg_sq_row", table.matrices)
        cols = _compact(operands, "exp_avg_sq_col", table.matrices)
        sqs = _compact(operands, "exp_avg_sq", table.flats)
        param_dtype = grad_dtype = None
        master = False
    lr = hp["lr"]
    lr_tensor = lr if isinstance(lr, Tensor) and not hp["relative_step"] else None
    lr_value = None if lr is None or lr_tensor is not None else float(lr)
    eps1, decay_rate = float(hp["eps1"]), float(hp["decay_rate"])
    stats, meta, tiles = work["stats"], table.meta, table.tile_tensor

    # 1. Row/column partial sums of g² + ε1, Σθ² per tile.  2. Row sums, column sums, Σθ² per tensor.
    _launch(ops.adafactor_pass1_, params, grads, masters, tables, meta, tiles, work["partials"], table.n_partials,
            eps1, grad_scale, found_inf, param_dtype, grad_dtype, master)
    _launch(ops.segment_sums_, work["partials"], table.stat_seg, stats)
    if table.n_stats:
        # 3. R_t, C_t (EMAs of the row and column means), in the state and in stats.  4. ΣR_t per matrix.
        _launch(ops.adafactor_statistics_, rows, cols, steps, tables, meta, table.stat_tensor, stats, table.n_rows,
                decay_rate, found_inf, tables_only is not None)
        _launch(ops.segment_sums_, stats[: table.n_rows], table.batch_seg, work["batch_sums"])
    # 5. ΣU² per tile (flat tensors: V_t first).  6. ΣU² per tensor.
    _launch(ops.adafactor_pass2_, grads, sqs, steps, tables, meta, tiles, stats, work["batch_sums"],
            work["usq_partials"], eps1, decay_rate, grad_scale, found_inf, grad_dtype)
    _launch(ops.segment_sums_, work["usq_partials"], table.tile_seg, work["usq_sums"])
    # 7. The update, and step += 1.
    _launch(ops.adafactor_pass3_, params, grads, sqs, exp_avgs, masters, steps, tables, meta, tiles, table.arrivals,
            stats, work["batch_sums"], work["usq_sums"], lr_value, lr_tensor, float(hp["eps2"]),
            float(hp["clip_threshold"]), hp["beta1"], float(hp["weight_decay"]), bool(hp["scale_parameter"]),
            bool(hp["relative_step"]), bool(hp["warmup_init"]), grad_scale, found_inf, param_dtype, grad_dtype, master)


adafactor.OPERANDS = ADAFACTOR_OPERANDS
adafactor.TABLES_ONLY = True
adafactor.build_table = TileTable.factored

RULES = {"adam": adam, "lamb": lamb, "adafactor": adafactor}
