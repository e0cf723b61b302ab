"""FusedAdafactor: drop-in for transformers' Adafactor, factored second moments, a fixed number of launches per step."""
from __future__ import annotations

import torch
from torch import Tensor

from .adam import _scalar
from .optimizer import FusedOptimizer, _local, state_dtype


class FusedAdafactor(FusedOptimizer):
    r"""Adafactor with fused multi-tensor kernels; a drop-in replacement for ``transformers.Adafactor``.

    .. math::
       \begin{aligned}
            &\textbf{input}: \theta_0 \text{ (params)}, f(\theta) \text{ (objective)}, \gamma \text{ (lr)},
                \epsilon_1, \epsilon_2 \text{ (eps)}, d \text{ (clip\_threshold)}, c \text{ (decay\_rate)},
                \beta_1, \lambda \text{ (weight decay)}, s \text{ (grad scale)} \\
            &\hspace{13mm} \textit{relative\_step}, \textit{warmup\_init}, \textit{scale\_parameter} \\
            &\textbf{initialize}: R_0 \leftarrow 0 \in \mathbb{R}^{\ldots\times n},
                C_0 \leftarrow 0 \in \mathbb{R}^{\ldots\times m} \text{ (rank} \geq 2 \text{, shape } \ldots
                \times n \times m), \quad V_0 \leftarrow 0 \text{ (rank 0, 1)}, \quad m_0 \leftarrow 0 \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_{\theta} f_t(\theta_{t-1}) / s \\
            &\hspace{5mm} \rho_t \leftarrow \min(10^{-6}\,t \text{ if } \textit{warmup\_init} \text{ else }
                10^{-2},\; 1/\sqrt{t}) \text{ if } \textit{relative\_step} \text{ else } \gamma \\
            &\hspace{5mm} \alpha_t \leftarrow \rho_t \cdot \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))
                \text{ if } \textit{scale\_parameter} \text{ else } \rho_t \\
            &\hspace{5mm} \hat\beta_{2t} \leftarrow 1 - t^{c} \\
            &\hspace{5mm} \textbf{if} \: \text{rank} \geq 2 \text{ (factored over the last two dims)} \\
            &\hspace{10mm} R_t \leftarrow \hat\beta_{2t} R_{t-1} + (1 - \hat\beta_{2t})
                \,\mathrm{mean}_{\text{cols}}(g_t^2 + \epsilon_1) \\
            &\hspace{10mm} C_t \leftarrow \hat\beta_{2t} C_{t-1} + (1 - \hat\beta_{2t})
                \,\mathrm{mean}_{\text{rows}}(g_t^2 + \epsilon_1) \\
            &\hspace{10mm} \hat V_t \leftarrow R_t C_t^\top / \mathrm{mean}(R_t) \\
            &\hspace{5mm} \textbf{else}: \hat V_t = V_t \leftarrow \hat\beta_{2t} V_{t-1}
                + (1 - \hat\beta_{2t})(g_t^2 + \epsilon_1) \\
            &\hspace{5mm} U_t \leftarrow g_t / \sqrt{\hat V_t} \\
            &\hspace{5mm} U_t \leftarrow \alpha_t \, U_t / \max(1, \mathrm{RMS}(U_t) / d) \\
            &\hspace{5mm} \textbf{if} \: \beta_1: m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) U_t,
                \; U_t \leftarrow m_t \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \lambda \alpha_t \theta_{t-1} - U_t \\
            &\textbf{return} \: \theta_t
       \end{aligned}

    :math:`\mathrm{RMS}(x) = \sqrt{\sum x^2 / \mathrm{numel}(x)}`; means, :math:`\mathrm{RMS}` and
    :math:`\mathrm{mean}(R_t)` are per matrix (per index of the leading dims for the row means). An
    :math:`n \times m` matrix keeps :math:`n + m` floats of second-moment state instead of :math:`n m`.

    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (2018), with the semantics of
    transformers' ``Adafactor``: same keywords, defaults, validation and state keys. The same symbols are used,
    line by line, in ``fused_optim/reference/adafactor.py`` (the spec; it lists where it follows and where it
    differs from transformers) and in ``kernels/adafactor.py`` (three passes over the grads, reductions on the
    device, no host synchronization: a step is CUDA-graph capturable).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): external learning rate :math:`\gamma`; only with ``relative_step=False``
            (then required). A 1-element tensor on the params' device is read by the kernels.
        eps (tuple of 2 floats): :math:`(\epsilon_1, \epsilon_2)`: added to the squared gradient, and the floor
            of the parameter scale (default: (1e-30, 1e-3)).
        clip_threshold (float): :math:`d`, threshold of the RMS of the unscaled update (default: 1.0).
        decay_rate (float): :math:`c`, exponent of the second-moment decay :math:`1 - t^c` (default: -0.8).
        beta1 (float, optional): momentum coefficient; ``None`` (default) keeps no first moment.
        weight_decay (float): :math:`\lambda`, scaled by :math:`\alpha_t` (default: 0).
        scale_parameter (bool): scale the step by :math:`\max(\epsilon_2, \mathrm{RMS}(\theta))` (default: True).
        relative_step (bool): time-dependent step size :math:`\rho_t` instead of ``lr`` (default: True).
        warmup_init (bool): linear warm-up of :math:`\rho_t`; needs ``relative_step`` (default: False).
        backend (str): ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see
            ``python -m fused_optim info``.
        master_weights (bool): for bf16/fp16 params, keep an fp32 copy in ``state["master_param"]``, update it in
            fp32 and write the rounded param from it (default: False).

    With ``relative_step=True`` (the default) ``group["lr"]`` is ``None``, as in transformers: an lr scheduler
    needs ``relative_step=False`` and an ``lr``.

    State per param (transformers' keys): ``step`` (float32 scalar tensor on the param's device),
    ``exp_avg_sq_row`` (shape ``p.shape[:-1]``) and ``exp_avg_sq_col`` (``p.shape[:-2] + p.shape[-1:]``) for
    rank >= 2, ``exp_avg_sq`` (``p.shape``) for rank 0 and 1, ``exp_avg`` (``p.shape``) with ``beta1``,
    ``master_param`` with ``master_weights``; all fp32 whatever the param dtype.
    """

    rule = "adafactor"
    dense_layouts = False  # the kernels read rows and columns of the params' 2-D views: contiguous params only
    state_keys = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")

    def __init__(
        self,
        params,
        lr: float | Tensor | None = None,
        eps: tuple = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        backend: str = "auto",
        master_weights: bool = False,
    ) -> None:
        name = type(self).__name__
        if lr is not None and relative_step:
            raise ValueError(f"{name}: cannot combine a manual lr={lr!r} with relative_step=True (the step size is "
                             "then computed from the step count); pass lr=None, or relative_step=False to use lr")
        if warmup_init and not relative_step:
            raise ValueError(f"{name}: warmup_init=True requires relative_step=True (it warms up the relative "
                             "step size); set relative_step=True, or warmup_init=False")
        if lr is None and not relative_step:
            raise ValueError(f"{name}: relative_step=False needs an external learning rate: pass lr=...")
        if lr is not None:
            lr = _scalar(lr, "lr")
            if not 0.0 <= lr:
                raise ValueError(f"Invalid learning rate: {lr}")
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"{name}: eps must be a pair (eps1, eps2), got {eps!r}")
        eps = (float(eps[0]), float(eps[1]))
        if not (eps[0] >= 0.0 and eps[1] >= 0.0):
            raise ValueError(f"{name}: eps values must be >= 0, got {eps!r}")
        if not clip_threshold > 0.0:
            raise ValueError(f"{name}: clip_threshold must be > 0, got {clip_threshold!r}")
        if not decay_rate <= 0.0:
            raise ValueError(f"{name}: decay_rate must be <= 0 (the decay is 1 - t**decay_rate), got {decay_rate!r}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"{name}: beta1 must be None or in [0, 1), got {beta1!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(
            lr=lr, eps=eps, clip_threshold=float(clip_threshold), decay_rate=float(decay_rate),
            beta1=None if beta1 is None else float(beta1), weight_decay=float(weight_decay),
            scale_parameter=bool(scale_parameter), relative_step=bool(relative_step), warmup_init=bool(warmup_init),
            backend=backend, master_weights=master_weights,
        )
        super().__init__(params, defaults)

    state_options = ("beta1", "master_weights")  # the group options _init_param_state reads

    def _init_param_state(self, p, state, group):
        if _local(p) is not p:
            raise NotImplementedError(
                f"{type(self).__name__}: sharded (DTensor, FSDP2) params are not supported yet: RMS(θ), RMS(U) and "
                "the row/column statistics of a shard need an all-reduce over the mesh (kernels/adafactor.py keeps "
                "those reductions as separate launches for it). Use unsharded params for this optimizer.")
        self._init_common_state(p, state, group)
        if p.dim() >= 2:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=state_dtype(p), device=p.device)
            if "exp_avg_sq_col" not in state:
                state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=state_dtype(p),
                                                      device=p.device)
        elif "exp_avg_sq" not in state:
            state["exp_avg_sq"] = self._zeros_state(p)
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = self._zeros_state(p)

    def _rule_hyperparameters(self, group):
        eps1, eps2 = group["eps"]
        return dict(
            lr=group["lr"], eps1=float(eps1), eps2=float(eps2), clip_threshold=float(group["clip_threshold"]),
            decay_rate=float(group["decay_rate"]), beta1=None if group["beta1"] is None else float(group["beta1"]),
            weight_decay=float(group["weight_decay"]), scale_parameter=bool(group["scale_parameter"]),
            relative_step=bool(group["relative_step"]), warmup_init=bool(group["warmup_init"]),
        )
