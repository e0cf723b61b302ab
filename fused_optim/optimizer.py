"""The base class of every fused_optim optimizer.

A subclass supplies its update rule's name, its state keys, how to initialize one param's state, and the
hyperparameters its rule takes; this class does the rest, the same way for every optimizer:

1. walk the param groups and check every param that has a grad (sparse, complex, device, shape, the chosen
   backend's requirements); any error is raised here, naming the param and its group, before any state is touched;
2. initialize missing state lazily: ``step`` (float32 scalar tensor on the param's device, as torch's fused Adam),
   per-element states in fp32 (fp64 for fp64 params), ``master_param`` (fp32) for bf16/fp16 params when the group
   has ``master_weights=True``;
3. group the tensors of each param group by (device, param dtype, grad dtype) into buckets and hand each bucket
   to its backend: one launch per bucket for the fused backends, whatever the number of tensors;
4. read ``grad_scale`` and ``found_inf`` when a ``torch.amp.GradScaler`` sets them (``_step_supports_amp_scaling``):
   the kernels unscale the grads and skip the whole step when ``found_inf`` is set, with no host synchronization;
5. bump the updated params' autograd version counters, as torch's in-place updates do (``_mark_updated``).

``load_state_dict`` keeps floating-point state in fp32: torch casts every state tensor to the param's dtype,
which would round the fp32 moments and master weights of a bf16 param to bf16.
"""
from __future__ import annotations

import warnings
from array import array
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, is_, is_not

import torch
from torch import Tensor
from torch.autograd.graph import increment_version
from torch.nn import Parameter

from . import backends, native
from . import tables
from .tables import STATE_DTYPE


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # a torch build without distributed support has no DTensor
        return ()
    return DTensor


_DTENSOR = None


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2); the kernels work on shards. Other tensors are returned as they are."""
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = _dtensor_type()
    return t.to_local() if isinstance(t, _DTENSOR) else t


def state_dtype(param: Tensor) -> torch.dtype:
    """Per-element optimizer state is fp32, or fp64 for fp64 params (reference backend only)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


_GRAD, _DTYPE, _SHAPE, _LAYOUT = attrgetter("grad"), attrgetter("dtype"), attrgetter("shape"), attrgetter("layout")
_DEVICE = attrgetter("device")
_PTR, _CONTIGUOUS = Tensor.data_ptr, Tensor.is_contiguous
_PLAIN = frozenset((Tensor, Parameter))  # the param types a planned step takes (csrc/plan.cpp: THPVariable_CheckExact)


_MATCH, _MOVED, _CHANGED = 0, 1, 2  # what a plan check finds (csrc/plan.cpp)


def _address_or_0(t) -> int:
    return 0 if t is None else t.data_ptr()


def _plan_match_py(params: list, states: list, names: list, present: list, param_dtype, grad_dtype,
                   addresses: array, shapes: list, state_dtype, numels: array, found: array,
                   device: torch.device, dense_layouts: bool) -> tuple:
    """The step plan's per-tensor check of one bucket; ``plan_match`` of the native extension (csrc/plan.cpp, whose
    comment says what each argument is) is the same check in C, used when the extension is there;
    tests/test_step_plan.py runs both on the same cases. Reads every param's grad and, from the params' state dicts,
    the states ``names``; returns ``(_MATCH, grads)``, ``(_MOVED, grads)`` (only addresses differ from
    ``addresses``) or ``(_CHANGED, None)`` (a missing or sparse grad, a state that appeared or went, another dtype
    or shape of a param or of its grad, a param not contiguous (with ``dense_layouts``: not dense), a grad or state
    tensor laid out unlike its param (``tables.laid_out``), a state tensor of another dtype or size (``numels``,
    -1: any), a tensor not on ``device``, anything unexpected: take the full path). The addresses read are written
    into ``found``."""
    n = len(shapes)
    if (len(params) != n or len(states) != n or len(present) != len(names) or len(addresses) != (2 + len(names)) * n
            or len(numels) != len(names) * n or len(found) != len(addresses)):
        return _CHANGED, None
    try:
        # Only plain tensors: a subclass could give ``.grad`` another meaning (the C check reads it in C++).
        if not all(map(_PLAIN.__contains__, map(type, params))):
            return _CHANGED, None
        grads = list(map(_GRAD, params))
        if not (all(map(is_, map(_LAYOUT, params), repeat(torch.strided)))
                and all(map(is_, map(_LAYOUT, grads), repeat(torch.strided)))  # a missing grad raises
                and all(map(is_, map(_DTYPE, params), repeat(param_dtype)))
                and all(map(is_, map(_DTYPE, grads), repeat(grad_dtype)))
                and list(map(_SHAPE, params)) == shapes and list(map(_SHAPE, grads)) == shapes
                and all(map(device.__eq__, map(_DEVICE, params))) and all(map(device.__eq__, map(_DEVICE, grads)))):
            return _CHANGED, None
        flat = all(map(_CONTIGUOUS, params))  # the common case: every tensor must be contiguous
        if flat:
            if not all(map(_CONTIGUOUS, grads)):
                return _CHANGED, None
        elif not (dense_layouts and all(map(tables.dense, params)) and all(map(tables.laid_out_like, grads, params))):
            return _CHANGED, None
        seen = list(map(_PTR, params)) + list(map(_PTR, grads))
        for j, (name, has) in enumerate(zip(names, present)):
            values = list(map(dict.get, states, repeat(name)))  # a state that is not a dict raises
            if tuple(map(is_not, values, repeat(None))) != (has if has is not True else (True,) * n):
                return _CHANGED, None  # a state appeared or went: lazy init decides
            # A non-tensor raises; a tensor at an unchanged address can still have another size or dtype.
            if not all(v is None or (v.layout is torch.strided and v.dtype is state_dtype
                                     and (v.is_contiguous() if flat else tables.laid_out(v, p))
                                     and want in (-1, v.numel()) and v.device == device)
                       for v, want, p in zip(values, numels[j * n:(j + 1) * n], params)):
                return _CHANGED, None
            seen.extend(map(_address_or_0, values))
    except Exception:  # a non-tensor, a tensor without storage
        return _CHANGED, None
    found[:] = array("q", seen)
    return (_MATCH if found == addresses else _MOVED), grads


class _State(defaultdict):
    """``optimizer.state``: torch.optim's ``defaultdict(dict)`` that also counts the calls that can change which
    state dict a param maps to (``_changes``). A planned step compares the count with the one its plan recorded
    instead of looking up every param (``Tensor.__hash__`` is Python code: about 0.1 us a param). A mapping of another
    type put in its place (by user code, or torch's ``load_state_dict`` before this class wraps it) is looked up param
    by param."""

    _changes = 0


def _counting(name: str):
    """``defaultdict``'s method ``name``, counting its calls in ``_changes``."""
    method = getattr(defaultdict, name)

    def counted(self, *args, **kwargs):
        self._changes += 1
        return method(self, *args, **kwargs)

    counted.__name__ = counted.__qualname__ = name
    return counted


# Every dict method that can add, replace or remove a key; defaultdict's __missing__ adds through __setitem__.
for _name in ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_State, _name, _counting(_name))
del _name


@dataclass
class _BucketPlan:
    """What one bucket of a finished step was made of; see :meth:`FusedOptimizer._planned_buckets`."""

    bucket: backends.Bucket
    params: list
    names: tuple  # the launcher's operands, in table order
    state_names: list  # the state operands some param has, in table order (what plan_match reads)
    state_present: list  # per state_names: True (every param has it) or a tuple of bools per param
    shapes: list  # of the params
    addresses: array  # int64: the table's addresses in table order, less those of the operands no param has
    numels: array  # int64: the elements the table's kernels read of each state tensor of state_names (-1: none)
    table: object  # the cached table those addresses are the key of
    found: array = None  # int64: the addresses of this step, as ``addresses`` (written by plan_match)

    def use(self, table) -> None:
        """Take ``table`` (a TensorTable or TileTable of this bucket), its addresses and its state sizes."""
        n = len(self.params)
        read = {"param", "grad", *self.state_names}
        self.table = table
        self.addresses = array("q", [a for k, name in enumerate(self.names) if name in read
                                     for a in table.key[0][k * n:(k + 1) * n]])
        self.numels = array("q", [-1 if want is None else want for name in self.state_names
                                  for want in table.expect[name]])
        self.found = array("q", self.addresses)

    def moved_table(self, device: torch.device):
        """The table with this step's addresses (``found``, read by plan_match, which checked those tensors):
        zeros for the operands no param has, the rest in table order."""
        n = len(self.params)
        read = {"param", "grad", *self.state_names}
        addresses, k = [], 0
        for name in self.names:
            if name in read:
                addresses.extend(self.found[k * n:(k + 1) * n])
                k += 1
            else:
                addresses.extend([0] * n)
        return tables.with_addresses(self.table, (tuple(addresses), tuple(self.shapes)), device)


@dataclass
class _GroupPlan:
    group: dict
    params: tuple
    idle: tuple  # the params that had no grad
    signature: tuple  # FusedOptimizer._plan_signature(group)
    buckets: list


class FusedOptimizer(torch.optim.Optimizer):
    """Base class; see the module docstring. Subclasses set ``rule`` and ``state_keys`` and implement
    ``_init_param_state`` and ``_rule_hyperparameters``."""

    rule: str = ""
    state_keys: tuple = ()  # per-element fp32 state keys, besides "step" and "master_param"
    # The param-group options that decide which state a param has (besides its dtype and shape): a step whose group
    # changed one of them since the last step runs lazy state init again (see ``_planned_buckets``).
    state_options: tuple = ("master_weights",)
    # The fused kernels of an elementwise rule walk each operand's memory flat, pairing a param's grad and state
    # with it element by element: any dense layout (torch.channels_last, a transposed matrix) does, shared by all
    # of them (tables.laid_out_like). A rule that reads rows and columns (Adafactor) takes contiguous params only.
    dense_layouts: bool = True
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf instead of unscaling itself

    def __init__(self, params, defaults: dict):
        backends.check_name(defaults["backend"])
        self._tables: dict = {}  # device tables of the fused backends, keyed by bucket; rebuilt on storage change
        self._plan: list | None = None  # the last step's buckets, see _planned_buckets
        self._plan_state: tuple = (None, None)  # the state mapping the plan saw and its _changes count
        super().__init__(params, defaults)
        self.state = _State(dict)

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, and names the problems of a param now (complex, a backend that cannot run it, a param listed
        twice) rather than at the first step; a group that fails is not added."""
        with warnings.catch_warnings():  # torch warns of duplicates, and will refuse them; refused below
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
            super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            first: dict = {}
            for i, p in enumerate(group["params"]):
                j = first.setdefault(id(p), i)
                if j != i:
                    name = type(self).__name__
                    raise ValueError(f"{name}: param group {gi} lists the same param twice (at {j} and {i}); a step "
                                     "would update it twice (in one launch, racing, on the fused backends): list "
                                     "each param once (torch.optim warns of this and will refuse it)")
            backends.check_name(group["backend"])
            for i, p in enumerate(group["params"]):
                self._check_param(p, gi, i, group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_param(self, p: Tensor, gi: int, i: int, group: dict) -> str:
        """Checks that do not depend on the grad; returns the backend that will run ``p``."""
        if p.is_complex():
            name = type(self).__name__
            raise RuntimeError(f"{name}: {self._where(gi, i)} is complex ({p.dtype}); {name} supports real params "
                               "only: register torch.view_as_real(param) as the parameter instead")
        lp = _local(p)
        return backends.resolve(group["backend"], lp.device, lp.dtype, backends.Where(gi, i), rule=self.rule)

    def __setstate__(self, state):
        super().__setstate__(state)
        # Groups loaded from torch.optim (or an older fused_optim) lack our keys: take them from the defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if type(self.state) is not _State:  # torch's load_state_dict, or an optimizer pickled without _State
            self.state = _State(dict, self.state)
        self._tables = {}
        self._plan = None
        self._plan_state = (None, None)

    # -- subclass hooks -----------------------------------------------------------------------------------------
    def _init_param_state(self, p: Tensor, state: dict, group: dict) -> None:
        """Create the missing per-param state of ``p`` (called lazily, only for keys that are missing)."""
        raise NotImplementedError

    def _rule_hyperparameters(self, group: dict) -> dict:
        """Keyword arguments of this optimizer's rule for one param group (floats or 1-element tensors)."""
        raise NotImplementedError

    def _check_groups(self) -> None:
        """Called first in every step: raise for group options that cannot hold together (e.g. FusedLAMB's
        optimizer-wide ``max_grad_norm`` set differently in two groups), before anything is touched."""

    def _step_hyperparameters(self, buckets: list, scaler: dict) -> dict:
        """Rule arguments that depend on the whole step rather than on one param group, e.g. a clip coefficient
        from the global gradient norm over every grad of the optimizer (FusedLAMB's ``max_grad_norm``).

        Called once per step after lazy state init and before any bucket is updated, with every bucket of the
        step and ``scaler[device] = (grad_scale, found_inf)`` (GradScaler's tensors on that device, or Nones).
        Returns ``{bucket.key: {name: value}}``, merged into that bucket's rule arguments. Default: none.
        """
        return {}

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    @staticmethod
    def _zeros_state(p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)

    @staticmethod
    def _init_common_state(p: Tensor, state: dict, group: dict) -> None:
        """``step``, and ``master_param`` exactly when the group's ``master_weights`` asks for one (bf16/fp16
        params): created from the param when missing, dropped when the option was turned off (the param, already
        its master rounded, goes on from there). So every param of a launch group has a master or none has: the
        fused kernels take that per launch, and a group changed mid-run (``master_weights`` is a state option)
        would otherwise mix them."""
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
        if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16):
            if "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
        elif "master_param" in state:
            del state["master_param"]

    @staticmethod
    def _where(group_index: int, index: int) -> str:
        return str(backends.Where(group_index, index))

    # -- step ---------------------------------------------------------------------------------------------------
    def _collect(self) -> list:
        """Check every param with a grad and bucket them; raises before any state is touched.

        Runs for every param at every step, so the per-param work is a handful of attribute reads (about 1 us
        for a param, measured); what holds for a whole bucket (backend, dtype support, lr device) is checked when
        the bucket is first seen. A grad's shape, dtype and device need no check: torch refuses to assign a grad
        that differs from its param in any of them. Its layout (sparse) and strides it does check: the kernels
        pair it with its param element by element in memory (``_check_layout``)."""
        name = type(self).__name__
        buckets: dict = {}
        global _DTENSOR
        if _DTENSOR is None:
            _DTENSOR = _dtensor_type()
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if _DTENSOR and isinstance(p, _DTENSOR):
                    lp, lg = p.to_local(), g.to_local()
                else:
                    lp, lg = p, g
                key = (gi, lp.device, lp.dtype, lg.dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    backend = self._check_param(p, gi, i, group)
                    if (backend != "reference" and isinstance(lr, Tensor) and lr.device.type != "cpu"
                            and lr.device != lp.device):
                        raise RuntimeError(f"{name}: the lr tensor of param group {gi} is on {lr.device} but "
                                           f"{self._where(gi, i)} is on {lp.device}; keep lr on the params' device "
                                           "or on the CPU")
                    bucket = buckets[key] = backends.Bucket(group, gi, backend, lp.device, lp.dtype, lg.dtype)
                if g.is_sparse:
                    raise RuntimeError(f"{name}: {self._where(gi, i)} has a sparse gradient; {name} supports dense "
                                       "gradients only (torch.optim.SparseAdam handles sparse embeddings)")
                if bucket.backend != "reference" and not (lp.is_contiguous() and lg.is_contiguous()):
                    self._check_layout(lp, lg, gi, i, bucket.backend)
                bucket.params.append(p)
                bucket.index.append(i)
                bucket.grads.append(lg)
                if lp is not p:
                    bucket.sharded = True
        return list(buckets.values())

    def _check_layout(self, p: Tensor, g: Tensor, gi: int, i: int, backend: str) -> None:
        """Raises unless the fused kernels can take param ``p`` (local) and its grad ``g``, not both contiguous:
        see ``dense_layouts``."""
        name, where = type(self).__name__, self._where(gi, i)
        if not self.dense_layouts and not p.is_contiguous():
            raise RuntimeError(
                f"{name}: {where} is not contiguous (shape {tuple(p.shape)}, strides {p.stride()}); "
                f"backend={backend!r} reads the rows and columns of contiguous params only: make the parameter "
                "contiguous before creating the optimizer (a model converted to torch.channels_last: convert it back "
                "with .to(memory_format=torch.contiguous_format)), or use backend='reference'")
        if not tables.dense(p):
            raise RuntimeError(
                f"{name}: {where} is a strided view with gaps or overlaps (shape {tuple(p.shape)}, strides "
                f"{p.stride()}); backend={backend!r} updates params that cover their memory exactly (contiguous, or "
                "permuted like torch.channels_last): make the parameter a tensor of its own (.clone()), or use "
                "backend='reference'")
        if not tables.laid_out_like(g, p):
            raise RuntimeError(
                f"{name}: the grad of {where} is laid out unlike its param (strides {g.stride()}, the param's "
                f"{p.stride()}); backend={backend!r} pairs grad and param element by element in memory: assign a "
                "grad laid out like its param (torch.empty_like(param).copy_(grad)), or use backend='reference'")

    def _group_hyperparameters(self, group: dict, device: torch.device) -> dict:
        hp = self._rule_hyperparameters(group)
        lr = hp.get("lr")
        if isinstance(lr, Tensor):
            if lr.device != device:
                hp["lr"] = float(lr)  # a CPU tensor: reading it is no device synchronization
            elif lr.dim() != 0:
                hp["lr"] = lr.reshape(())
        return hp

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._check_groups()
        buckets = self._planned_buckets()
        planned = buckets is not None
        if not planned:
            buckets = self._collect()
            for bucket in buckets:
                init, group, states = self._init_param_state, bucket.group, self.state
                for p in bucket.params:
                    state = states[p]
                    init(p, state, group)
                    bucket.states.append(state)
                if bucket.sharded:
                    # The kernels see shards (FSDP2); the optimizer's own state keeps the DTensors, as torch.optim's.
                    bucket.params = [_local(p) for p in bucket.params]
                    bucket.states = [{k: _local(v) if isinstance(v, Tensor) else v for k, v in s.items()}
                                     for s in bucket.states]

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        on_device: dict = {}  # GradScaler's tensors, moved once per device
        for bucket in buckets:
            dev = bucket.device
            if dev not in on_device:
                on_device[dev] = tuple(None if t is None else t.to(dev, non_blocking=True)
                                       for t in (grad_scale, found_inf))
        try:
            for bucket in buckets:  # every table built or checked before any launch: a bad operand writes nothing
                backends.prepare(bucket, self.rule, tables=self._tables)
            whole_step = self._step_hyperparameters(buckets, on_device) if buckets else {}
            for bucket in buckets:
                dev = bucket.device
                gs, fi = on_device[dev]
                hp = self._group_hyperparameters(bucket.group, dev)
                hp.update(whole_step.get(bucket.key, {}))
                backends.run(bucket, self.rule, hp, tables=self._tables, grad_scale=gs, found_inf=fi)
                self._mark_updated(bucket)
        except BaseException:
            self._plan = None  # the next step takes the full path, which checks everything again
            raise
        else:
            if planned:
                self._update_plan()
            else:
                self._record_plan(buckets)
        finally:
            for bucket in buckets:
                bucket.end_step()
        return loss

    @staticmethod
    def _mark_updated(bucket) -> None:
        """Bump the autograd version counters of the params a fused launch wrote, as torch.optim's in-place updates
        do (the reference path's torch ops bump their own): autograd then refuses a backward through a graph that
        saved a param before this step, rather than computing gradients from the updated values. Sharded params
        bump their DTensors too. State tensors are the optimizer's own and are not bumped (about 50 ns a tensor)."""
        if bucket.backend != "reference":
            increment_version(bucket.params)
        if bucket.sharded:
            params = bucket.group["params"]
            increment_version([params[i] for i in bucket.index])

    # -- the step plan ------------------------------------------------------------------------------------------
    # With many small tensors a step is host-bound: walking every param in Python (its grad, checks, bucketing,
    # lazy state init, the operand lists, the table key) cost more than the launches. So a step that succeeded
    # leaves a plan of its buckets, and the next step reuses them after re-reading, with C-level ``map`` calls rather
    # than Python code per param, everything the plan depends on: the same groups holding the same params
    # (identity), unchanged group options that decide the state (``state_options``), backend and lr placement, no
    # grad on the params that had none; per bucket the same state dicts (looked up only when ``self.state`` is not
    # the unchanged _State the plan saw), and, in one call per bucket (``plan_match`` of the native extension,
    # csrc/plan.cpp, or the same check in Python, ``_plan_match_py``, without it), every param's grad, the params'
    # dtype, shape, layout, device and addresses, the grads' dtype, shape, layout, device and addresses,
    # which state tensors each param has, their addresses, dtypes, layouts, devices and sizes. Anything different
    # (or raising, e.g. a sparse grad) and the step takes the full path above, which checks and raises as before and
    # records a new plan. New grad objects at new addresses keep the plan: the table takes the addresses plan_match
    # read (tables.with_addresses: new address tables, the same map). A tensor moved to another device
    # (``p.data = p.data.cpu()``) has a new address too; its device sends the step through the full path instead.
    # Sharded (DTensor) and reference buckets always take the full path.
    # A planned bucket whose table was not rebuilt builds no operand lists, and launches the native Adam, LAMB and
    # Adafactor operators (and LAMB's gradient-norm pass) with their tables alone (backends._run_native,
    # grad_sq_norm; csrc/ops_common.h, TablesOnly; csrc/adafactor_ops.h). The checks here stand in for the
    # operator's (and for tables.check_operands): every address equal to the table's, the params' and grads' dtype,
    # shape, layout and device, the state tensors' dtype, layout, device and sizes.
    def _plan_signature(self, group: dict) -> tuple:
        lr = group["lr"]
        return (group["backend"], lr.device if isinstance(lr, Tensor) else None,
                tuple(group[k] for k in self.state_options))

    def _record_plan(self, buckets: list) -> None:
        self._plan = None
        if any(b.backend == "reference" or b.sharded for b in buckets):
            return
        by_group: dict = {}
        for b in buckets:
            by_group.setdefault(b.group_index, []).append(b)
        plan = []
        for gi, group in enumerate(self.param_groups):
            params = tuple(group["params"])
            bucket_plans = []
            for b in by_group.get(gi, ()):
                table = self._tables.get(b.key)
                if table is None:
                    return
                names = backends.operand_names(b.backend, self.rule)
                if names[:2] != ("param", "grad"):
                    return
                state_names, state_present = [], []
                for name in names[2:]:
                    has = tuple(s.get(name) is not None for s in b.states)
                    if any(has):
                        state_names.append(name)
                        state_present.append(True if all(has) else has)
                bp = _BucketPlan(b, list(b.params), names, state_names, state_present, list(map(_SHAPE, b.params)),
                                 array("q"), array("q"), None)
                bp.use(table)
                bucket_plans.append(bp)
            plan.append(_GroupPlan(group, params, tuple(p for p in params if p.grad is None),
                                   self._plan_signature(group), bucket_plans))
        self._plan = plan
        self._plan_state = (self.state, getattr(self.state, "_changes", None))

    def _update_plan(self) -> None:
        """After a planned step whose table was rebuilt (new addresses): remember the new table."""
        for gp in self._plan:
            for bp in gp.buckets:
                table = self._tables.get(bp.bucket.key)
                if table is None:
                    self._plan = None
                    return
                if table is not bp.table:
                    bp.use(table)

    def _planned_buckets(self) -> list | None:
        """The buckets of this step if the plan of the last one still holds, else None (take the full path)."""
        plan = self._plan
        if plan is None or len(plan) != len(self.param_groups):
            return None
        match = native.plan_match() or _plan_match_py
        state = self.state
        # Unless ``state`` is the very _State the plan saw, unchanged since, every param's state dict is looked up.
        planned_state, changes = self._plan_state
        look_up = not (state is planned_state and type(state) is _State and state._changes == changes)
        try:
            buckets, moved = [], []
            for group, gp in zip(self.param_groups, plan):
                params = group["params"]
                if (group is not gp.group or len(params) != len(gp.params) or not all(map(is_, params, gp.params))
                        or self._plan_signature(group) != gp.signature
                        or any(map(is_not, map(_GRAD, gp.idle), repeat(None)))):
                    return None
                for bp in gp.buckets:
                    b = bp.bucket
                    if look_up and not all(map(is_, map(state.__getitem__, bp.params), b.states)):
                        return None
                    found, grads = match(bp.params, b.states, bp.state_names, bp.state_present, b.param_dtype,
                                         b.grad_dtype, bp.addresses, bp.shapes, STATE_DTYPE, bp.numels, bp.found,
                                         b.device, self.dense_layouts)
                    if found == _CHANGED:
                        return None
                    buckets.append((b, grads, bp))
                    moved.append(found == _MOVED)
        except Exception:  # anything unexpected (a deleted state dict): the full path decides
            return None
        for (b, grads, bp), move in zip(buckets, moved):
            table = bp.table
            if move:  # new addresses, every tensor checked above: the same map, new address tables
                table = self._tables[b.key] = bp.moved_table(b.device)
            b.grads, b.checked_table = grads, table
        return [b for b, *_ in buckets]

    # -- state_dict -------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict saved by this optimizer or by its torch.optim counterpart.

        Same as :meth:`torch.optim.Optimizer.load_state_dict` (hooks included), except that:

        * floating-point state stays fp32 (fp64 for fp64 params): torch would cast it to the param's dtype (bf16
          moments, bf16 master weights). ``step`` becomes a float32 scalar tensor on the param's device, as the
          kernels read it there. This is applied to the state_dict the load pre-hooks returned, before any load
          post-hook runs, so that hooks edit what is loaded, as with torch.
        * each param group keeps this optimizer's ``backend``: it says where the step runs, not what it computes,
          and a checkpoint saved where another backend ran (``"triton"`` on a GPU machine) must load anywhere.
          Every other group option (lr, betas, ``master_weights``, ...) comes from the state_dict, as torch's do.
        """
        loaded = []
        backends_here = [group["backend"] for group in self.param_groups]

        def take(optimizer, state_dict):  # runs after every other load pre-hook: what torch loads
            loaded.append(state_dict)

        def fix(optimizer):  # runs before every other load post-hook
            self._fix_loaded_state(loaded[-1])
            for group, backend in zip(self.param_groups, backends_here):
                group["backend"] = backend

        pre = self.register_load_state_dict_pre_hook(take)
        post = self.register_load_state_dict_post_hook(fix, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _fix_loaded_state(self, state_dict: dict) -> None:
        """Put back the fp32 state torch's load_state_dict cast to the params' dtype, from ``state_dict``, laid out as
        its param (a checkpoint of a contiguous model loads into a channels_last one)."""
        saved_state = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            state = self.state[p]
            for key, value in saved_state[saved_id].items():
                if not isinstance(value, Tensor):
                    if key == "step":
                        state[key] = torch.tensor(float(value), dtype=torch.float32, device=p.device)
                    continue
                if key == "step":
                    state[key] = value.to(device=p.device, dtype=torch.float32)
                elif value.is_floating_point():
                    value = value.to(device=p.device, dtype=state_dtype(p))
                    if value.shape == p.shape and _local(p) is p and not tables.laid_out_like(value, p):
                        # Saved from a param of another memory format: the kernels pair state and param element
                        # by element in memory, so the state takes the param's layout (the same values).
                        value = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    state[key] = value
        self._tables = {}
        self._plan = None
