"""The batched engine's optimiser: the trainer's Adam/SGD on tensors with a subject axis.

Adam and SGD update every element on its own, so one torch optimiser over a stacked tensor
(subjects x the tensor's shape) moves each subject's slice exactly as that subject's own run
would (the same single-tensor update the trainer runs: :func:`pft.core.adaptation.make_optimizer`).
All subjects of a chunk start together, so they share the step count; when some stop, the state
of the others is carried over to the compacted stacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pft.core.adaptation import AdaptConfig, make_optimizer

FUSED_MIN = 1 << 16
"""With ``fused``, stacks at least this large use torch's fused Adam kernel (one pass instead of
six, ~6x faster on full-T stacks; it rounds differently by ~1 ulp); smaller ones keep the
trainer's exact update."""


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
        self.fused = fused and config.optimizer == "adam"
        self.params = params
        self._build()

    def _build(self) -> None:
        big = [p for p in self.params.values() if self.fused and p.numel() >= FUSED_MIN]
        small = [p for p in self.params.values() if not any(p is q for q in big)]
        self._optimizers = [
            make_optimizer(group, self.config, fused=is_big)
            for group, is_big in ((small, False), (big, True))
            if group
        ]

    def step(self, grads: Sequence[Tensor]) -> None:
        """One update of every stack with its gradient (in ``params`` order)."""
        for p, g in zip(self.params.values(), grads, strict=True):
            p.grad = g
        for opt in self._optimizers:
            opt.step()
        for p in self.params.values():
            p.grad = None

    def keep(self, idx: Tensor) -> dict[str, Tensor]:
        """Keep the subjects at ``idx``: new stacked leaves (returned) with their optimiser state."""
        states = {name: self._state(p) for name, p in self.params.items()}
        self.params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in self.params.items()}
        self._build()
        for name, p in self.params.items():
            old = states[name]
            if not old:
                continue
            new = {k: v[idx].clone() if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in old.items()}
            for opt in self._optimizers:
                if any(q is p for g in opt.param_groups for q in g["params"]):
                    opt.state[p] = new
        return self.params

    def _state(self, p: Tensor) -> dict[str, object]:
        for opt in self._optimizers:
            if p in opt.state:
                return dict(opt.state[p])
        return {}

    @torch.no_grad()
    def state_of(self, name: str) -> dict[str, object]:
        """The optimiser state of one stack (for tests)."""
        return self._state(self.params[name])
