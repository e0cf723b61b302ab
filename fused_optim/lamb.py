"""FusedLAMB: LAMB with a two-pass multi-tensor kernel and deterministic per-tensor norms."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from .adam import _scalar
from .optimizer import FusedOptimizer, _local
from .reference.lamb import clip_coefficient


class FusedLAMB(FusedOptimizer):
    r"""LAMB (You et al., 2020) with fused multi-tensor kernels: Adam's moments, and a per-tensor trust ratio
    that scales each layer's step to the size of its weights.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)}, \theta_0 \text{ (params)},
                f(\theta) \text{ (objective)}, \lambda \text{ (weight decay)}, \epsilon, \\
            &\hspace{13mm} \textit{bias\_correction}, \textit{layer\_adaptation}, [\phi_l, \phi_u]
                \text{ (trust\_clip)}, \kappa \text{ (max\_grad\_norm)}, s \text{ (grad scale)} \\
            &\textbf{initialize}: m_0 \leftarrow 0, v_0 \leftarrow 0 \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_{\theta} f_t(\theta_{t-1}) / s
                \quad (\text{written back to } \texttt{param.grad} \text{ when a GradScaler is used}) \\
            &\hspace{5mm} \textbf{if} \: \kappa: g_t \leftarrow c \, g_t, \quad
                c = \min(1, \kappa / G), \quad G = \big(\textstyle\sum_{\text{every grad of the optimizer}}
                \lVert g_t \rVert^2\big)^{1/2} \\
            &\hspace{5mm} m_t \leftarrow \mathrm{lerp}(m_{t-1}, g_t, 1 - \beta_1)
                \quad (= \beta_1 m_{t-1} + (1-\beta_1) g_t) \\
            &\hspace{5mm} v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\hspace{5mm} \textbf{if} \: \textit{bias\_correction}: \hat{m}_t \leftarrow m_t / (1-\beta_1^t),
                \: \hat{v}_t \leftarrow v_t / (1-\beta_2^t) \quad \textbf{else}: \hat{m}_t \leftarrow m_t,
                \: \hat{v}_t \leftarrow v_t \\
            &\hspace{5mm} u_t \leftarrow \hat{m}_t / (\sqrt{\hat{v}_t} + \epsilon) + \lambda \theta_{t-1} \\
            &\hspace{5mm} \textbf{if} \: \textit{layer\_adaptation}: \\
            &\hspace{10mm} r_t \leftarrow \lVert\theta_{t-1}\rVert / \lVert u_t \rVert \: \textbf{if} \:
                \lVert\theta_{t-1}\rVert > 0 \textbf{ and } \lVert u_t \rVert > 0 \: \textbf{else} \: 1
                \quad (\text{norms per tensor}) \\
            &\hspace{10mm} \textbf{if} \: \textit{trust\_clip}: r_t \leftarrow \min(\max(r_t, \phi_l), \phi_u) \\
            &\hspace{5mm} \textbf{else}: r_t \leftarrow 1 \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \gamma \, r_t \, u_t \\
            &\textbf{return} \: \theta_t
       \end{aligned}

    The same symbols are used, line by line, in ``fused_optim/reference/lamb.py`` (the spec) and in
    ``kernels/lamb.py``. You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 Minutes"
    (ICLR 2020, arXiv:1904.00962 v3, Algorithm 2; the clamp is the paper's scaling function φ). With
    ``bias_correction=False`` it is exactly the TensorFlow ``LAMBOptimizer`` the authors derived from BERT's
    ``AdamWeightDecayOptimizer``.

    **Kernels** (``backend="triton"``, and ``"native"``: csrc/lamb_rule.h on the CUDA and CPU engines, the same
    passes and op order): two passes over the tensors, 40 bytes per fp32 param: pass 1 reads
    θ, g, m, v, writes m, v and per-block partial sums of θ² and u²; a deterministic segment sum turns them into
    per-tensor norms; pass 2 recomputes u and writes θ. The squares and every sum of them are float64, as in the
    reference (an fp32 square overflows from |x| ~ 1.8e19 and vanishes below ~2.6e-23), the element math fp32.
    ``max_grad_norm`` adds one read of every grad (4 B/param) and keeps G and c on the device: no host
    synchronization anywhere, so a step can be captured in a CUDA graph (tested on a GPU by tests/test_lamb.py,
    tests marked ``gpu``). A group with ``layer_adaptation=False`` needs no norms and takes one pass (28 B/param).
    The same inputs give bitwise the same result on every run.

    **apex's FusedLAMB** (``use_nvlamb=False``, its default) adapts only the params whose group has
    ``weight_decay != 0`` and clips with ``max_grad_norm=1.0``. The same here, with two param groups::

        decay = [p for p in model.parameters() if p.ndim >= 2]      # weights
        no_decay = [p for p in model.parameters() if p.ndim < 2]    # biases, norm weights
        opt = FusedLAMB([
            {"params": decay, "weight_decay": 0.01},
            {"params": no_decay, "weight_decay": 0.0, "layer_adaptation": False},
        ], lr=1e-3, max_grad_norm=1.0)

    (apex's ``use_nvlamb=True``: one group, ``layer_adaptation=True``, the default here.)

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate :math:`\gamma` (default: 1e-3). A 1-element tensor on the params'
            device is read by the kernel (no host synchronization); on the CPU it is read on the host.
        betas (tuple of 2 floats): :math:`\beta_1, \beta_2` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-6, as the paper's BERT runs and apex).
        weight_decay (float): :math:`\lambda`, decoupled: added to the direction :math:`u` (default: 0.01).
        bias_correction (bool): divide the moments by :math:`1-\beta^t` (default: True).
        max_grad_norm (float or None): :math:`\kappa`; when set, every gradient of the optimizer (all param
            groups) is scaled by :math:`\min(1, \kappa / G)` before the moments, with :math:`G` the global L2 norm
            of the (unscaled) gradients. ``param.grad`` itself is not modified (default: None, no clipping).
            One value for the whole optimizer, kept in every param group (as torch keeps its options, so that a
            state_dict saves and restores it): a group added later takes it, and a step refuses groups that
            disagree (set ``group["max_grad_norm"]`` in every group to change it).
        trust_clip (pair of floats or None): :math:`(\phi_l, \phi_u)`, clamp the trust ratio to
            :math:`[\phi_l, \phi_u]`, ``0 <= lo <= hi`` (``hi`` may be ``math.inf``) (default: None).
        layer_adaptation (bool): use the trust ratio; ``False`` gives :math:`r = 1` (and ignores
            ``trust_clip``): the usual choice for biases and norm weights (default: True). Per param group.
        backend (str): ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see
            ``python -m fused_optim info``.
        master_weights (bool): for bf16/fp16 params, keep an fp32 copy in ``state["master_param"]``; norms and
            update use it and the param gets the rounded result (default: False).

    State per param (as torch.optim's Adam): ``step`` (float32 scalar tensor on the param's device),
    ``exp_avg``, ``exp_avg_sq`` (fp32 whatever the param dtype), ``master_param`` (master_weights, bf16/fp16).
    """

    rule = "lamb"
    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        max_grad_norm: float | None = None,
        trust_clip: tuple | None = None,
        layer_adaptation: bool = True,
        backend: str = "auto",
        master_weights: bool = False,
    ) -> None:
        defaults = dict(
            lr=_scalar(lr, "lr"), betas=betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
            layer_adaptation=layer_adaptation, backend=backend, master_weights=master_weights,
        )
        self._check_hyperparameters(defaults, "FusedLAMB")
        super().__init__(params, defaults)

    # -- validation -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_hyperparameters(group: dict, where: str) -> None:
        """Normalize (betas and trust_clip to float tuples) and check one param group's (or the defaults')
        hyperparameters; ``where`` names them in the error."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"{where}: a tensor lr must have 1 element, got shape {tuple(lr.shape)}")
        if not 0.0 <= lr:
            raise ValueError(f"{where}: invalid learning rate {lr!r}: use lr >= 0")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        betas = tuple(float(_scalar(b, f"betas[{i}]")) for i, b in enumerate(betas))
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{where}: invalid beta parameter at index {i}: {b!r}; use 0 <= beta < 1")
        group["betas"] = betas
        if not 0.0 <= group["eps"]:
            raise ValueError(f"{where}: invalid epsilon value {group['eps']!r}: use eps >= 0")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"{where}: invalid weight_decay value {group['weight_decay']!r}: use weight_decay >= 0")
        for key in ("bias_correction", "layer_adaptation", "master_weights"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{where}: {key} must be True or False, got {group[key]!r}")
        mgn = group["max_grad_norm"]
        if mgn is not None and not (isinstance(mgn, (int, float)) and 0.0 < mgn < math.inf):
            raise ValueError(f"{where}: invalid max_grad_norm {mgn!r}: use a finite number > 0, or None for no "
                             "gradient clipping")
        clip = group["trust_clip"]
        if clip is not None:
            try:
                lo, hi = (float(x) for x in clip)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: trust_clip must be a pair (lo, hi) of numbers, or None; got {clip!r}")
            if not (0.0 <= lo <= hi) or math.isinf(lo):
                raise ValueError(f"{where}: invalid trust_clip {clip!r}: need 0 <= lo <= hi with lo finite "
                                 "(hi may be math.inf), e.g. trust_clip=(0.0, 10.0)")
            group["trust_clip"] = (lo, hi)

    def add_param_group(self, param_group: dict) -> None:
        """As the base class's, and checks the group's hyperparameters; a group that fails is not added. A group
        without ``max_grad_norm`` takes the optimizer's (the other groups' value, which a loaded state_dict may
        have changed)."""
        if self.param_groups and "max_grad_norm" not in param_group:
            param_group = {**param_group, "max_grad_norm": self.param_groups[0]["max_grad_norm"]}
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._check_hyperparameters(group, f"FusedLAMB param group {index}")
            ours = (self.param_groups[0] if index else self.defaults)["max_grad_norm"]
            if group["max_grad_norm"] != ours:
                raise ValueError(
                    f"FusedLAMB param group {index}: max_grad_norm={group['max_grad_norm']!r} differs from the "
                    f"optimizer's ({ours!r}); it is one clip over the global norm of every gradient of the "
                    "optimizer: set it in the constructor only")
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_groups(self) -> None:
        """``max_grad_norm`` is read from the groups at every step (a loaded state_dict or a user may have set it
        there): it must be valid and the same in every group."""
        first = self.param_groups[0]["max_grad_norm"] if self.param_groups else None
        for index, group in enumerate(self.param_groups):
            mgn = group["max_grad_norm"]
            if mgn is not None and not (isinstance(mgn, (int, float)) and 0.0 < mgn < math.inf):
                raise ValueError(f"FusedLAMB param group {index}: invalid max_grad_norm {mgn!r}: use a finite "
                                 "number > 0, or None for no gradient clipping")
            if mgn != first:
                raise ValueError(
                    f"FusedLAMB: param group {index} has max_grad_norm={mgn!r} but param group 0 has {first!r}; it "
                    "is one clip over the global norm of every gradient of the optimizer: set the same value in "
                    "every group (for group in opt.param_groups: group['max_grad_norm'] = ...)")

    # -- FusedOptimizer hooks ---------------------------------------------------------------------------------
    def _check_param(self, p, gi, i, group):
        backend = super()._check_param(p, gi, i, group)
        if _local(p) is not p and any(placement.is_partial() for placement in p.placements):
            raise NotImplementedError(
                f"{type(self).__name__}: {self._where(gi, i)} is a DTensor with a Partial placement "
                f"({p.placements}): its local values are not its elements, so its norms cannot be formed; "
                "redistribute it to Shard or Replicate placements (FSDP2 params are Shard(0))")
        return backend

    def _init_param_state(self, p, state, group):
        self._init_common_state(p, state, group)
        if "exp_avg" not in state:
            state["exp_avg"] = self._zeros_state(p)
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = self._zeros_state(p)

    def _rule_hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"], beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), bias_correction=bool(group["bias_correction"]),
            trust_clip=group["trust_clip"], layer_adaptation=bool(group["layer_adaptation"]), grad_clip=None,
        )

    def _step_hyperparameters(self, buckets, scaler):
        """With max_grad_norm: c = min(1, max_grad_norm / G) over every grad of every bucket, as a 0-d float64
        tensor on each bucket's device. Each bucket's Σg² is computed by its backend on its device (float64 squares
        and sums on every backend); the sums are added in float64 on the first bucket's device, in bucket order
        (deterministic), with torch ops: no value is read back to the host.

        Buckets of sharded params (FSDP2) also get ``reduce_sums`` (:class:`_ShardSums`): their kernels compute
        ‖θ‖², ‖u‖² and Σg² of the local shards, which this adds over the ranks holding the other shards of each
        tensor, one all-reduce per mesh dimension it is sharded on; every rank steps the same buckets in the same
        order, as FSDP2 gives every rank a grad (possibly empty) of every param."""
        out = {}
        for b in buckets:
            if b.sharded:
                reduce = _ShardSums([b.group["params"][i] for i in b.index])
                if reduce.parts:
                    out[b.key] = {"reduce_sums": reduce}
        max_grad_norm = self.param_groups[0]["max_grad_norm"]  # the same in every group (_check_groups)
        if max_grad_norm is None:
            return out
        home = buckets[0].device
        sq = []
        for b in buckets:
            reduce = out.get(b.key, {}).get("reduce_sums")
            each = backends.grad_sq_norm(b, self.rule, tables=self._tables, grad_scale=scaler[b.device][0],
                                         found_inf=scaler[b.device][1], per_tensor=reduce is not None)
            sq.append(each if reduce is None else reduce(each[None])[0].sum())
        total = torch.stack([s.to(home, torch.float64, non_blocking=True) for s in sq]).sum()
        c = clip_coefficient(max_grad_norm, total)  # float64: the kernels round it to fp32, fp64 params use it as is
        on_device = {}
        for b in buckets:
            if b.device not in on_device:
                on_device[b.device] = c.to(b.device, non_blocking=True)
        for b in buckets:
            out.setdefault(b.key, {})["grad_clip"] = on_device[b.device]
        return out


class _ShardSums:
    """Adds per-tensor sums of squares of shards (float64, the last dimension indexing a bucket's tensors) over the
    ranks that hold the other shards of each tensor: for a DTensor param, an all-reduce (SUM) over each dimension of
    its mesh it is sharded on (Shard placements of size > 1; Replicate ones hold the whole tensor already, and
    summing over them would count it again). Tensors sharded alike are reduced together, one collective per mesh
    dimension; plain tensors, and DTensors whose shard is the whole tensor, are left as they are. Sums of squares
    add across shards, so the result is the whole tensor's sum, in an order fixed by the collective."""

    def __init__(self, params: list):
        by_groups: dict = {}
        for i, p in enumerate(params):
            groups = ()
            if _local(p) is not p:
                mesh = p.device_mesh
                groups = tuple(mesh.get_group(d) for d, placement in enumerate(p.placements)
                               if placement.is_shard() and mesh.size(d) > 1)
            by_groups.setdefault(groups, []).append(i)
        self.n = len(params)
        self.parts = [(groups, index) for groups, index in by_groups.items() if groups]

    def __call__(self, sums: Tensor) -> Tensor:
        """Reduces ``sums`` (``[..., n]``, float64) in place; returns it."""
        import torch.distributed as dist

        for groups, index in self.parts:
            at = None if len(index) == self.n else torch.tensor(index, device=sums.device)
            part = sums if at is None else sums[..., at]  # a copy: reduced, then written back
            for group in groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            if at is not None:
                sums[..., at] = part
        return sums

    def of_tensor(self, i: int):
        """The reduction of tensor ``i`` alone, for a per-tensor caller (the reference): a function of its sums."""
        import torch.distributed as dist

        groups = next((groups for groups, index in self.parts if i in index), ())

        def reduce(sums: Tensor) -> Tensor:
            for group in groups:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            return sums

        return reduce
