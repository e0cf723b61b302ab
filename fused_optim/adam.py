"""FusedAdam and FusedAdamW: drop-in for torch.optim.Adam / AdamW, one kernel launch per step."""
from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import FusedOptimizer


def _scalar(x, name: str):
    """A hyperparameter as a float, or a 1-element tensor kept as a 0-d tensor (lr only)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return x.reshape(())
    return x


class FusedAdam(FusedOptimizer):
    r"""Adam with fused multi-tensor kernels; a drop-in replacement for :class:`torch.optim.Adam`.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)}, \theta_0 \text{ (params)},
                f(\theta) \text{ (objective)}, \lambda \text{ (weight decay)}, \epsilon, \\
            &\hspace{13mm} \textit{amsgrad}, \textit{maximize}, \textit{decoupled}, s \text{ (grad scale)} \\
            &\textbf{initialize}: m_0 \leftarrow 0, v_0 \leftarrow 0, \hat{v}^{max}_0 \leftarrow 0 \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_{\theta} f_t(\theta_{t-1}) / s
                \quad (\text{written back to } \texttt{param.grad} \text{ when a GradScaler is used}) \\
            &\hspace{5mm} \textbf{if} \: \textit{maximize}: g_t \leftarrow -g_t \\
            &\hspace{5mm} \textbf{if} \: \lambda \neq 0 \\
            &\hspace{10mm} \textbf{if} \: \textit{decoupled}: \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                \quad \text{(AdamW)} \\
            &\hspace{10mm} \textbf{else}: g_t \leftarrow g_t + \lambda\theta_{t-1} \quad \text{(Adam, L2)} \\
            &\hspace{5mm} m_t \leftarrow \mathrm{lerp}(m_{t-1}, g_t, 1 - \beta_1) \\
            &\hspace{5mm} v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\hspace{5mm} \textbf{if} \: \textit{amsgrad}: \hat{v}^{max}_t \leftarrow \max(\hat{v}^{max}_{t-1}, v_t),
                \: \hat{v}_t \leftarrow \hat{v}^{max}_t \quad \textbf{else}: \hat{v}_t \leftarrow v_t \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t} \cdot
                \frac{m_t}{\sqrt{\hat{v}_t}/\sqrt{1-\beta_2^t} + \epsilon} \\
            &\textbf{return} \: \theta_t
       \end{aligned}

    The same symbols are used, line by line, in ``fused_optim/reference/adam.py`` (the spec) and in
    ``kernels/adam.py``. It follows torch.optim's single-tensor Adam; Kingma & Ba (2015), Loshchilov & Hutter
    (2019) for decoupled decay, Reddi et al. (2018) for amsgrad.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate :math:`\gamma` (default: 1e-3). A 1-element tensor on the params'
            device is read by the kernel (no host synchronization, CUDA-graph safe); on the CPU it is read on
            the host.
        betas (tuple of 2 floats): :math:`\beta_1, \beta_2` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        amsgrad (bool): use the amsgrad variant (default: False).
        foreach, fused: accepted for compatibility with torch.optim: ``None`` (and ``foreach=False``,
            ``fused=True``) change nothing, since this optimizer is always fused; other values are refused.
        maximize (bool): maximize the objective (default: False).
        capturable (bool): accepted for compatibility. Every step of this optimizer is capturable in a CUDA
            graph: steps live on the params' device and no value is read back to the host.
        differentiable (bool): must be False; the kernels update in place outside autograd.
        decoupled_weight_decay (bool): AdamW's decoupled weight decay (default: False; FusedAdamW sets it).
        backend (str): ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see
            ``python -m fused_optim info``.
        master_weights (bool): for bf16/fp16 params, keep an fp32 copy in ``state["master_param"]``, update it in
            fp32 and write the rounded param from it in the same kernel (default: False).

    State per param (as torch.optim): ``step`` (float32 scalar tensor on the param's device), ``exp_avg``,
    ``exp_avg_sq`` (fp32 whatever the param dtype), ``max_exp_avg_sq`` (amsgrad), ``master_param``
    (master_weights, bf16/fp16 params).
    """

    rule = "adam"
    state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        master_weights: bool = False,
    ) -> None:
        lr = _scalar(lr, "lr")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = tuple(float(_scalar(b, f"betas[{i}]")) for i, b in enumerate(betas))
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if foreach:
            raise ValueError(f"{type(self).__name__} is always fused (one multi-tensor launch); foreach=True does "
                             "not apply: drop the argument, or use torch.optim with foreach=True")
        if fused is False:
            raise ValueError(f"{type(self).__name__} is always fused; for an unfused per-tensor step use "
                             "backend='reference' (or torch.optim)")
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: its kernels update "
                             "params in place outside autograd; use torch.optim.Adam(differentiable=True)")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, backend=backend, master_weights=master_weights,
        )
        super().__init__(params, defaults)

    state_options = ("amsgrad", "master_weights")  # the group options _init_param_state reads

    def _init_param_state(self, p, state, group):
        self._init_common_state(p, state, group)
        if "exp_avg" not in state:
            state["exp_avg"] = self._zeros_state(p)
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = self._zeros_state(p)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._zeros_state(p)

    def _rule_hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"], beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]), decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
        )


class FusedAdamW(FusedAdam):
    r"""AdamW with fused multi-tensor kernels; a drop-in replacement for :class:`torch.optim.AdamW`.

    :class:`FusedAdam` with ``decoupled_weight_decay=True`` and ``weight_decay=1e-2`` by default (the algorithm
    box is FusedAdam's, decoupled branch: :math:`\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)`).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            backend=backend, master_weights=master_weights,
        )
