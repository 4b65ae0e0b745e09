"""The batched engine's optimiser: the trainer's Adam/SGD update on tensors with a subject axis.

Adam and SGD update every element on its own, so the trainer's update applied to a stacked tensor
(subjects x the tensor's shape) moves each subject's slice exactly as that subject's own run
would. All subjects of a chunk start together, so they share the step count; when some stop, the
state of the others is carried over to the compacted stacks.

The update is torch's single-tensor ``Adam``/``SGD`` sequence (default betas and eps, no
amsgrad, no nesterov, no dampening) written out, not a ``torch.optim`` optimiser: the first use of
``torch.optim`` in a process imports ``torch._dynamo`` (about 2 s on the 2-core test machine),
which the engine's own update does not need. ``tests/test_batched_engine.py`` checks it against
``torch.optim.Adam``/``SGD`` bit for bit, before and after compaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pft.core.adaptation import AdaptConfig

FUSED_MIN = 1 << 16
"""With ``fused``, stacks at least this large use torch's fused Adam kernel (one pass instead of
six, ~6x faster on full-T stacks; it rounds differently by ~1 ulp); smaller ones keep the
trainer's exact update."""

_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, which the trainer uses


class StackedOptimizer:
    """Adam/SGD (``AdaptConfig.optimizer``) over a chunk's stacked trainable tensors.

    Parameters
    ----------
    params:
        The stacked tensors by name (leaves with ``requires_grad``), subject axis first.
    config:
        The trainer's settings (optimiser, lr, momentum, weight decay).
    fused:
        Run torch's fused Adam kernel on stacks of at least :data:`FUSED_MIN` elements.
    """

    def __init__(self, params: dict[str, Tensor], config: AdaptConfig, fused: bool = False) -> None:
        self.config = config
        self.fused = fused
        self.params = params
        self.state: dict[str, list[Tensor]] = {name: [] for name in params}
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """One update of every stack with its gradient (in ``params`` order)."""
        self.steps += 1
        for (name, param), grad in zip(self.params.items(), grads, strict=True):
            _update(param, grad, self.state[name], self.config, self.steps, self.fused)

    def keep(self, idx: Tensor) -> dict[str, Tensor]:
        """Keep the subjects at ``idx``: new stacked leaves (returned) with their optimiser state."""
        self.params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in self.params.items()}
        self.state = {k: [s[idx].clone() for s in v] for k, v in self.state.items()}
        return self.params


def _update(
    param: Tensor, grad: Tensor, state: list[Tensor], cfg: AdaptConfig, step: int, fused: bool
) -> None:
    """``torch.optim.Adam``/``SGD`` (default options) on a stacked tensor: the single-tensor path
    (bit-identical to the trainer's optimiser) for small stacks, the fused Adam kernel for large."""
    if cfg.optimizer == "sgd":
        if cfg.weight_decay != 0:
            grad = grad.add(param, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            if not state:
                state.append(grad.clone())
            else:
                state[0].mul_(cfg.momentum).add_(grad)
            grad = state[0]
        param.add_(grad, alpha=-cfg.lr)
        return
    if not state:
        state.extend([torch.zeros_like(param), torch.zeros_like(param)])
    exp_avg, exp_avg_sq = state
    if fused and param.numel() >= FUSED_MIN and hasattr(torch, "_fused_adam_"):
        # torch's fused Adam kernel (what ``Adam(fused=True)`` runs): one pass instead of six,
        # ~6x faster on the large stacks of full-T adaptation; it rounds differently by ~1 ulp
        step_t = torch.tensor(float(step), device=param.device)
        torch._fused_adam_(
            [param], [grad], [exp_avg], [exp_avg_sq], [], [step_t],
            lr=cfg.lr, beta1=_BETA1, beta2=_BETA2, weight_decay=cfg.weight_decay, eps=_EPS,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        return
    if cfg.weight_decay != 0:
        grad = grad.add(param, alpha=cfg.weight_decay)
    exp_avg.lerp_(grad, 1 - _BETA1)
    exp_avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
    bias_correction1 = 1 - _BETA1**step
    bias_correction2 = 1 - _BETA2**step
    step_size = cfg.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(_EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)
