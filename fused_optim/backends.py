"""Backends: which are usable here and why not, how ``backend="auto"`` picks one, and the one dispatcher.

* ``reference``: pure PyTorch per tensor (``fused_optim/reference``). Always usable; the oracle of every test.
* ``triton``: the Triton multi-tensor engine (``kernels/``, imported as ``fused_optim.kernels``). CUDA tensors;
  CPU tensors only under ``TRITON_INTERPRET=1`` (how CI runs the kernels).
* ``native``: the compiled extension ``fused_optim._C`` (CUDA kernels and a CPU engine; built by setup.py or
  JIT-built on first use, see ``fused_optim/native.py``).

``auto`` picks, per group of tensors sharing (device, dtype): native when it is usable for them, else triton
(CUDA), else reference, and warns once per reason when it has to fall back.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field

import torch

from . import native, reference
from .tables import TensorTable, check_operands, readdress, storage_key

NAMES = ("auto", "triton", "native", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """A named backend cannot run here; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------------
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return None


def triton_unusable(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device``, or None if it can."""
    err = _triton_import_error()
    if err:
        return err
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if interpret:
            return ("TRITON_INTERPRET=1 is set: Triton's interpreter runs on CPU tensors only; unset it to run the "
                    "triton backend on CUDA tensors")
        return None
    if device.type == "cpu":
        if interpret:
            return None
        return ("the triton backend runs CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, for "
                "testing); use backend='native' or 'reference' on CPU")
    return f"the triton backend does not support device type {device.type!r}"


def native_unusable(device: torch.device) -> str | None:
    """Why the native backend cannot run on ``device``, or None if it can: the extension is not built and cannot
    be JIT-built (with the compiler's message), or it was built without CUDA kernels (fused_optim/native.py).
    Cached per device type after the first call, which may JIT-build the extension."""
    return native.unusable_reason(device)


def unusable(name: str, device: torch.device) -> str | None:
    if name == "reference":
        return None
    if name == "triton":
        return triton_unusable(device)
    if name == "native":
        return native_unusable(device)
    raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")


def check_name(backend: str) -> str:
    if backend not in NAMES:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {', '.join(map(repr, NAMES))}")
    return backend


_warned: set = set()


class Where(tuple):
    """(param group, index) of a param, formatted only when an error message needs it."""

    def __new__(cls, group_index: int, index: int):
        return super().__new__(cls, (group_index, index))

    def __str__(self) -> str:
        return f"param {self[1]} of param group {self[0]}"


_resolved: dict = {}  # (requested, device, dtype, rule, TRITON_INTERPRET) -> backend name or why it cannot run


def unusable_for(name: str, device: torch.device, rule: str) -> str | None:
    """``unusable`` for one update rule: the native extension implements the rules of ``native.RULES`` only."""
    why = unusable(name, device)
    if why is None and name == "native" and rule not in native.RULES:
        why = (f"the native extension has no {rule!r} rule yet (it has {sorted(native.RULES)}); "
               "use backend='triton' on CUDA or backend='reference'")
    return why


def resolve(requested: str, device: torch.device, dtype: torch.dtype, where: str, rule: str = "adam") -> str:
    """The backend that runs a group of tensors on ``device`` with param dtype ``dtype``.

    ``where`` names the tensors for error messages ("param 3 of param group 0"). A named backend that cannot run
    raises :class:`BackendUnavailable`; ``auto`` never raises: it falls back native -> triton (CUDA) -> reference,
    with one warning per device type and reason. ``rule``: the optimizer's update rule; a backend without that
    rule (the native extension has those of ``native.RULES``) cannot run it. Called for every param at every step,
    so the answer is memoized (availability only changes with the environment).
    """
    key = (requested, device, dtype, rule, os.environ.get("TRITON_INTERPRET"))
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(requested, device, dtype, rule)
    if isinstance(found, BackendUnavailable):
        raise BackendUnavailable(f"backend={requested!r} cannot run {where} (on {device}): {found}")
    return found


def _resolve(requested: str, device: torch.device, dtype: torch.dtype, rule: str):
    if requested == "reference":
        return "reference"
    if requested in ("triton", "native"):
        reason = unusable_for(requested, device, rule)
        if reason is None and dtype not in KERNEL_DTYPES:
            reason = (f"its kernels support float32, float16 and bfloat16 params, not {dtype}; "
                      f"use backend='reference' for {dtype}")
        return BackendUnavailable(reason) if reason else requested
    # auto
    if dtype not in KERNEL_DTYPES:
        if device.type == "cuda":
            _warn_once(f"fused_optim: backend='auto' falls back to the reference path for {dtype} params on "
                       f"{device}: {dtype} params are not supported by the fused kernels")
        return "reference"
    native_why = unusable_for("native", device, rule)
    if native_why is None:
        return "native"
    if device.type == "cuda":
        triton_why = triton_unusable(device)
        if triton_why is None:
            _warn_once(f"fused_optim: backend='auto' uses triton on {device.type}: the native backend cannot run "
                       f"({native_why})")
            return "triton"
        _warn_once(f"fused_optim: backend='auto' falls back to the reference path on {device.type}: the native "
                   f"backend cannot run ({native_why}), nor triton ({triton_why})")
    elif device.type == "cpu":
        _warn_once(f"fused_optim: backend='auto' uses the reference path on cpu: the native backend cannot run "
                   f"({native_why})")
    return "reference"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=5)


def report() -> list[dict]:
    """One row per backend and device type: usable or why not (``python -m fused_optim info``)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in ("triton", "native", "reference"):
        for dev in devices:
            why = unusable(name, dev)
            rows.append({"backend": name, "device": dev.type, "usable": why is None, "why": why or ""})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Bucket:
    """Tensors of one param group that share (device, param dtype, grad dtype): one launch of a fused backend."""

    group: dict
    group_index: int
    backend: str
    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)  # local tensors (the shards of DTensor grads)
    states: list = field(default_factory=list)  # the optimizer's per-param state dicts
    sharded: bool = False  # some params are DTensors: params and states are swapped for their local shards
    index: list = field(default_factory=list)  # position of each param in its group's "params"
    # Set by the optimizer's step plan (optimizer.py) when it has already read this step's tensors and found the
    # cached table's addresses equal to theirs: then no operand list is built to check them again here.
    checked_table: object = None
    prepared: tuple | None = None  # (table, operand lists or None) of this step, from prepare()

    def end_step(self) -> None:
        """Drop what one step read. A step plan keeps its buckets between steps: holding the grads would keep them
        alive after ``zero_grad(set_to_none=True)`` (a second set of grads in memory during the next backward,
        and new grads at new addresses, so a table rebuilt at every step)."""
        self.grads, self.prepared, self.checked_table = [], None, None

    @property
    def key(self) -> tuple:
        return (self.group_index, self.device, self.param_dtype, self.grad_dtype)

    def operands(self, names) -> dict:
        """Operand lists by name, in the order a kernel's ``OPERANDS`` lists them; state keys a param does not
        have (``max_exp_avg_sq`` without amsgrad, ``master_param`` for fp32 params) give ``None``."""
        out = {}
        for name in names:
            if name == "param":
                out[name] = self.params
            elif name == "grad":
                out[name] = self.grads
            else:
                out[name] = [s.get(name) for s in self.states]
        return out


def operand_names(backend: str, rule: str) -> tuple:
    """The operands (in table order) that ``backend``'s launcher of ``rule`` reads; () for the reference."""
    return tuple(_launcher(backend, rule).OPERANDS) if backend in ("triton", "native") else ()


def prepare(bucket: Bucket, rule: str, *, tables: dict) -> None:
    """Build or check the device table of ``bucket`` for ``rule`` (triton and native; nothing for the reference),
    for :func:`run` and :func:`grad_sq_norm` to use in this step. Raises ValueError for an operand the kernels
    cannot take: the optimizer prepares every bucket of a step before it launches any, so that a bad operand
    leaves every param and state untouched."""
    if bucket.backend in ("triton", "native"):
        bucket.prepared = _table(bucket, _launcher(bucket.backend, rule), tables)


def _launcher(backend: str, rule: str):
    """The triton or native launcher of ``rule``."""
    if backend == "triton":
        from . import kernels  # imported on first use: TRITON_INTERPRET must be set before the kernels are defined

        return kernels.RULES[rule]
    return native.RULES[rule]


def run(bucket: Bucket, rule: str, hp: dict, *, tables: dict, grad_scale=None, found_inf=None) -> None:
    """Apply update rule ``rule`` with hyperparameters ``hp`` to every tensor of ``bucket``.

    ``tables``: the optimizer's cache of device tables (triton/native), keyed by ``bucket.key``.
    ``grad_scale``/``found_inf``: GradScaler's device tensors (already on ``bucket.device``), or None.
    """
    if bucket.backend == "reference":
        _run_reference(bucket, rule, hp, grad_scale, found_inf)
    elif bucket.backend == "triton":
        _run_triton(bucket, rule, hp, tables, grad_scale, found_inf)
    elif bucket.backend == "native":
        _run_native(bucket, rule, hp, tables, grad_scale, found_inf)
    else:
        raise ValueError(f"unknown backend {bucket.backend!r}")


def _run_reference(bucket, rule, hp, grad_scale, found_inf):
    # The reference reads found_inf on the host: it is the readable spec, not the fast path.
    if found_inf is not None and float(found_inf) != 0.0:
        return
    fn = reference.RULES[rule]
    reduce_sums = hp.get("reduce_sums")  # the per-bucket reduction (FusedLAMB under FSDP2), taken per tensor here
    for i, (p, g, st) in enumerate(zip(bucket.params, bucket.grads, bucket.states)):
        operands = {n: st.get(n) for n in fn.OPERANDS}
        if reduce_sums is not None:
            hp = dict(hp, reduce_sums=reduce_sums.of_tensor(i))
        fn(p, g, **operands, **hp, master_param=st.get("master_param"), grad_scale=grad_scale)


def _table(bucket, launcher, tables) -> tuple:
    """``(table, operands)``: the cached device table of ``bucket`` for ``launcher``'s operands (triton or native),
    rebuilt when a tensor's storage changed, and the operand lists read to check that (None when the step plan had
    checked this table: ``bucket.checked_table``). Raises ValueError for an operand the kernels cannot take
    (``check_operands``), on a rebuild and on reuse: equal addresses do not prove equal sizes and dtypes. Once a
    step has prepared the bucket (:func:`prepare`), its result."""
    if bucket.prepared is not None:
        return bucket.prepared
    table = tables.get(bucket.key)
    if table is not None and table is bucket.checked_table:
        return table, None
    operands = bucket.operands(launcher.OPERANDS)
    where = lambda i: Where(bucket.group_index, bucket.index[i])  # noqa: E731 (names a param in an error)
    key = storage_key(operands)
    if table is not None and table.key == key:
        check_operands(operands, table.expect, where=where)
    elif table is not None and table.key[1] == key[1] and list(table.ptrs) == list(operands):
        # Only addresses moved (new grads after zero_grad(set_to_none=True)): new address tables, the same map.
        table = tables[bucket.key] = readdress(table, operands, bucket.device, where, key)
    else:
        # A rule whose kernels need another map than the 1-D block map (Adafactor's 2-D tiles) brings its builder.
        table = getattr(launcher, "build_table", TensorTable.build)(operands, bucket.device, where=where)
        tables[bucket.key] = table
    return table, operands


def _run_triton(bucket, rule, hp, tables, grad_scale, found_inf):
    launcher = _launcher("triton", rule)
    table, _ = _table(bucket, launcher, tables)
    launcher(table, hp, param_dtype=bucket.param_dtype, grad_dtype=bucket.grad_dtype,
             master=bucket.states[0].get("master_param") is not None,
             grad_scale=grad_scale, found_inf=found_inf)


def grad_sq_norm(bucket: Bucket, rule: str, *, tables: dict, grad_scale=None, found_inf=None,
                 per_tensor: bool = False) -> torch.Tensor:
    """The sum of squares of every grad of ``bucket`` (divided by ``grad_scale`` first), as a 0-d tensor on
    ``bucket.device``: one bucket's share of a global gradient norm (FusedLAMB's ``max_grad_norm``).

    Fused backends compute it on the device, deterministically and without a host synchronization, reading the
    grads through the table ``rule`` uses (built or reused here). With ``found_inf`` set they skip the reads and
    return 0: the step is skipped anyway. The reference computes it in float64. ``per_tensor``: the sum of each
    grad, float64 ``[n]``.
    """
    if bucket.backend == "reference":
        return reference.grad_sq_norm(bucket.grads, grad_scale, per_tensor)
    if bucket.backend == "triton":
        from . import kernels

        table, _ = _table(bucket, _launcher("triton", rule), tables)
        return kernels.grad_sq_norm(table, grad_dtype=bucket.grad_dtype, grad_scale=grad_scale,
                                    found_inf=found_inf, per_tensor=per_tensor)
    if bucket.backend == "native":
        table, operands = _table(bucket, _launcher("native", rule), tables)
        if operands is None:  # the step plan checked the grads against this table: pass it alone
            return native.grad_sq_norm(table, None, grad_scale=grad_scale, found_inf=found_inf,
                                       grad_dtype=bucket.grad_dtype, per_tensor=per_tensor)
        return native.grad_sq_norm(table, bucket.grads, grad_scale=grad_scale, found_inf=found_inf,
                                   per_tensor=per_tensor)
    raise ValueError(f"unknown backend {bucket.backend!r}")


def _run_native(bucket, rule, hp, tables, grad_scale, found_inf):
    launcher = native.RULES[rule]
    table, operands = _table(bucket, launcher, tables)
    if operands is None and getattr(launcher, "TABLES_ONLY", False):
        # The step plan checked this step's tensors against this very table: the operator needs no lists.
        master = bucket.states[0].get("master_param") is not None
        launcher(table, None, hp, grad_scale=grad_scale, found_inf=found_inf,
                 tables_only=(bucket.param_dtype, bucket.grad_dtype, master))
        return
    if operands is None:
        operands = bucket.operands(launcher.OPERANDS)
    launcher(table, operands, hp, grad_scale=grad_scale, found_inf=found_inf)
