"""The stage-3 objective of SFDA-PFT, defined once: its terms, their weights and shipped defaults.

Every path that personalises T evaluates THIS objective: the trainer
(:class:`pft.core.adaptation.PFTAdaptation`, one person's batch, ``reduction="mean"``), the DP-SGD
path (:class:`pft.core.privacy.DPPFTAdaptation`, one value per frame, ``reduction="none"``) and the
batched engine (:mod:`pft.simulations.batched`, stacked subjects ``(M, B, K)``, one value per
subject). What differs between them is only how the forward pass is computed; its results reach
the objective as :class:`PairOutputs`, and what the person is pulled toward as
:class:`ReferenceTargets`.

Paper (stage 3, target adaptation): F and C frozen, T adapted on the person's neutral frames, with
prediction consistency between two target images and identity alignment to the reference source
style. As implemented (docs/method.md)::

    L = lambda_consistency * KL(stopgrad p_b || p_a)                    (per frame)
      + lambda_style * (||mu(T(f_a)) - mu_ref||^2 + ||sigma(T(f_a)) - sigma_ref||^2)   (per batch)
      + lambda_neutral * CE_smooth(C(T(f_a)), neutral)                   (per frame)

with ``p_a = C(T(f_a))`` for a frame a and ``p_b = C(T(f_b + noise))`` (or ``C(f_b + noise)``, the
frozen path) for a partner frame b of the same person.

Adding a term is one change here: a :class:`Term` (its value from :class:`PairOutputs` and
:class:`ReferenceTargets`, whether it is per frame, and which outputs it ``requires``), a weight
field on :class:`PFTObjective`, and one line in :meth:`PFTObjective.terms`. The trainer and the DP
path then follow; the batched engine follows on its general (autograd) path, and its bias-only
fast path either provides what the term requires or says so and falls back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, cast

import torch
from pydantic import Field
from torch import Tensor

from pft.core.config import FrozenConfig
from pft.core.losses import (
    Reduction,
    batch_statistics,
    consistency_loss,
    moment_distance,
    neutral_calibration_loss,
    reference_mean_loss,
)

Output = Literal["logits_a", "logits_b", "translated_a", "batch_stats"]
"""What a forward pass can give the objective (see :class:`PairOutputs`)."""

StyleForm = Literal["batch", "reference_mean", "drop"]
"""How the style term is computed: the paper's batch statistics, the per-frame distance to the
reference mean (decomposes over frames, for DP-SGD), or not at all."""


@dataclass
class PairOutputs:
    """What one step's forward pass gives the objective, for frames a and their partners b.

    Shapes carry any leading dimensions ``...`` (none for one person, ``M`` for stacked subjects).

    Attributes
    ----------
    logits_a:
        (..., B, K) ``C(T(f_a))``, carrying the gradient to T's trainable tensors.
    logits_b:
        (..., B, K) the consistency target: ``C(T(f_b + noise))`` or ``C(f_b + noise)`` (detached).
    translated_a:
        (..., B, D) ``T(f_a)``; None where a forward does not form it per frame.
    batch_mean, batch_std:
        (..., D) mean and std of ``T(f_a)`` over the batch, given by a forward that computes them
        without ``translated_a`` (e.g. the bias-only fast path); else derived from ``translated_a``.
    """

    logits_a: Tensor
    logits_b: Tensor
    translated_a: Tensor | None = None
    batch_mean: Tensor | None = None
    batch_std: Tensor | None = None

    def provides(self) -> frozenset[Output]:
        """The outputs present."""
        have: set[Output] = {"logits_a", "logits_b"}
        if self.translated_a is not None:
            have |= {"translated_a", "batch_stats"}
        if self.batch_mean is not None and self.batch_std is not None:
            have.add("batch_stats")
        return frozenset(have)

    def batch_statistics(self) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` of ``T(f_a)`` over the batch: given, or from ``translated_a``."""
        if self.batch_mean is not None and self.batch_std is not None:
            return self.batch_mean, self.batch_std
        if self.translated_a is None:
            raise ValueError("the style term needs PairOutputs.translated_a or batch_mean/batch_std")
        return batch_statistics(self.translated_a)

    def translated(self) -> Tensor:
        """``T(f_a)`` per frame, or a clear error."""
        if self.translated_a is None:
            raise ValueError("this term needs PairOutputs.translated_a (T(f_a) per frame)")
        return self.translated_a


@dataclass(frozen=True)
class ReferenceTargets:
    """What stage 3 pulls a person's translated neutral frames toward: the neutral pooled-feature
    mean and std of the matched reference source subjects (the statistics a bundle ships).

    Tensors of shape (..., D); stacked subjects carry a leading axis (:meth:`stack`). A field added
    here is moved, stacked and selected with the others.
    """

    mean: Tensor
    std: Tensor

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ReferenceTargets:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ReferenceTargets(
            **cast(dict[str, Any], {k: None if v is None else fn(v) for k, v in values.items()})
        )

    def to(self, device: torch.device | str) -> ReferenceTargets:
        """The same targets on ``device`` (float32)."""
        return self._map(lambda t: t.to(device=device, dtype=torch.float32))

    def select(self, rows: Tensor) -> ReferenceTargets:
        """Stacked targets of the subjects at ``rows`` (leading axis)."""
        return self._map(lambda t: t[rows])

    @classmethod
    def stack(cls, targets: Sequence[ReferenceTargets]) -> ReferenceTargets:
        """One subject's targets per row: tensors (M, ...)."""
        columns = {f.name: [getattr(t, f.name) for t in targets] for f in dataclasses.fields(cls)}
        return cls(
            **cast(dict[str, Any], {n: None if v[0] is None else torch.stack(v) for n, v in columns.items()})
        )


class Term(Protocol):
    """One term of the objective.

    ``value`` is (..., B) for a per-frame term (``per_sample``) and (...,) for one that couples the
    frames of a batch; ``requires`` names the :class:`PairOutputs` it reads.
    """

    @property
    def name(self) -> str:
        """Key of the term in logs and histories."""
        ...

    @property
    def per_sample(self) -> bool:
        """Whether the term has one value per frame (needed for DP-SGD's per-sample gradients)."""
        ...

    @property
    def requires(self) -> frozenset[Output]:
        """The forward outputs the term reads."""
        ...

    def value(self, outputs: PairOutputs, targets: ReferenceTargets | None) -> Tensor:
        """The unweighted term: (..., B) if ``per_sample``, else (...,)."""
        ...


@dataclass(frozen=True)
class Consistency:
    """``KL(stopgrad p_b || p_a)`` per frame (paper: prediction consistency of two target images)."""

    name: str = "consistency"
    per_sample: bool = True
    requires: frozenset[Output] = frozenset({"logits_a", "logits_b"})

    def value(self, outputs: PairOutputs, targets: ReferenceTargets | None) -> Tensor:
        """Per-frame KL (..., B)."""
        return consistency_loss(outputs.logits_a, outputs.logits_b, reduction="none")


@dataclass(frozen=True)
class NeutralCalibration:
    """The known-neutral term: smoothed cross-entropy of ``C(T(f_a))`` to the neutral class.

    With smoothing eps the target is ``p(neutral) = 1 - eps + eps / K``: frames C finds deeply
    neutral are pulled back toward the boundary, expressive ones toward neutral (a calibration).
    """

    neutral_class: int
    smoothing: float
    name: str = "neutral"
    per_sample: bool = True
    requires: frozenset[Output] = frozenset({"logits_a"})

    def value(self, outputs: PairOutputs, targets: ReferenceTargets | None) -> Tensor:
        """Per-frame smoothed cross-entropy (..., B)."""
        return neutral_calibration_loss(outputs.logits_a, self.neutral_class, self.smoothing, "none")


def _require_targets(targets: ReferenceTargets | None, term: str) -> ReferenceTargets:
    if targets is None:
        raise ValueError(f"the {term} term needs the reference targets (ModelParts.targets)")
    return targets


@dataclass(frozen=True)
class StyleAlignment:
    """``||mu(T(f_a)) - mu_ref||^2 + ||sigma(T(f_a)) - sigma_ref||^2`` over the batch (paper:
    identity alignment, ``L_style`` on the pooled layer). Couples the frames of a batch."""

    name: str = "style"
    per_sample: bool = False
    requires: frozenset[Output] = frozenset({"batch_stats"})

    def value(self, outputs: PairOutputs, targets: ReferenceTargets | None) -> Tensor:
        """One value per batch (...,)."""
        ref = _require_targets(targets, self.name)
        mu, sigma = outputs.batch_statistics()
        return moment_distance(mu, sigma, ref.mean, ref.std)


@dataclass(frozen=True)
class StyleToReferenceMean:
    """Per frame ``||T(f_a) - mu_ref||^2``: the style term's per-frame form (for DP-SGD). For T's
    output bias its batch mean has the gradient of :class:`StyleAlignment`; for more of T it also
    penalises the frames' spread around ``mu_ref``."""

    name: str = "style"
    per_sample: bool = True
    requires: frozenset[Output] = frozenset({"translated_a"})

    def value(self, outputs: PairOutputs, targets: ReferenceTargets | None) -> Tensor:
        """Per-frame squared distance (..., B)."""
        ref = _require_targets(targets, self.name)
        return reference_mean_loss(outputs.translated(), ref.mean, reduction="none")


class ObjectiveValue(NamedTuple):
    """The weighted total and each unweighted term, with the shape the reduction gives."""

    total: Tensor
    terms: dict[str, Tensor]


class PFTObjective(FrozenConfig):
    """The stage-3 objective's weights and settings, with the SHIPPED DEFAULTS.

    Defaults (re-selected on the validation cohort seeds 100-102 of generator v6 - biovid, stressid
    and bah, the profiles weighted equally; the sweep is in docs/results.md, "Validation"):
    consistency weight 0.5, style weight 0 (pulling the translated neutral statistics onto the
    references' lowered the mean F1), the known-neutral calibration term with weight 1 and label
    smoothing 0.6 (a target p(neutral) of 0.7 for two classes; 0.5 was 1.4 points lower on the
    validation mean, 0.6-0.7 a plateau), partner-frame noise std 0.05 and the translated path as
    the consistency target.

    Attributes
    ----------
    lambda_consistency, lambda_style, lambda_neutral:
        The terms' weights (a term with weight 0 is not computed).
    neutral_class, neutral_smoothing:
        The known label of the adaptation frames and the calibration's label smoothing.
    noise_std:
        Std of the Gaussian noise added to the partner frames' features (the second target image).
    consistency_target:
        ``translated``: ``p_b = C(T(f_b + noise))``; ``frozen``: ``C(f_b + noise)`` (the figure's
        frozen path).
    style_form:
        ``batch`` (the paper's term, couples frames), ``reference_mean`` (per frame, see
        :class:`StyleToReferenceMean`) or ``drop``. The DP path replaces ``batch`` by its
        per-frame form (:meth:`per_sample`).
    """

    lambda_consistency: float = Field(0.5, ge=0)
    lambda_style: float = Field(0.0, ge=0)
    lambda_neutral: float = Field(1.0, ge=0)
    neutral_class: int = Field(0, ge=0)
    neutral_smoothing: float = Field(0.6, ge=0, lt=1)
    noise_std: float = Field(0.05, ge=0)
    consistency_target: Literal["translated", "frozen"] = "translated"
    style_form: StyleForm = "batch"

    def terms(self) -> tuple[tuple[float, Term], ...]:
        """The active terms (positive weight) with their weights, in a fixed order."""
        style_forms: dict[StyleForm, Term | None] = {
            "batch": StyleAlignment(),
            "reference_mean": StyleToReferenceMean(),
            "drop": None,
        }
        style = style_forms[self.style_form]
        candidates: tuple[tuple[float, Term | None], ...] = (
            (self.lambda_consistency, Consistency()),
            (self.lambda_style, style),
            (self.lambda_neutral, NeutralCalibration(self.neutral_class, self.neutral_smoothing)),
        )
        return tuple((w, t) for w, t in candidates if w > 0 and t is not None)

    @property
    def requires(self) -> frozenset[Output]:
        """Every forward output the active terms read."""
        need: set[Output] = {"logits_a"}
        for _, term in self.terms():
            need |= term.requires
        return frozenset(need)

    @property
    def passes(self) -> int:
        """Forward passes of T per step: 2 when the consistency target is the translated path."""
        return 2 if self.consistency_target == "translated" else 1

    def per_sample(self, style_term: Literal["reference_mean", "drop"]) -> PFTObjective:
        """This objective with every term per frame: the batch style term becomes ``style_term``."""
        if self.style_form != "batch":
            return self
        return self.model_copy(update={"style_form": style_term})

    def evaluate(
        self, outputs: PairOutputs, targets: ReferenceTargets | None, reduction: Reduction = "mean"
    ) -> ObjectiveValue:
        """The objective on one step's outputs.

        Parameters
        ----------
        outputs:
            The forward's outputs, with leading dimensions ``...`` and a batch axis B.
        targets:
            The reference statistics, (..., D) (needed by the style terms).
        reduction:
            ``"mean"``: per-frame terms averaged over the batch, total (...,); ``"none"``: one
            value per frame (..., B) - refused when an active term couples the frames.

        Returns
        -------
        ObjectiveValue
            The weighted total and the unweighted terms by name. With no active term the total
            is zero (still on the autograd graph).

        Raises
        ------
        ValueError
            ``reduction="none"`` with a batch term, an unknown reduction, or an output or target
            a term needs is missing.
        """
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
        missing = self.requires - outputs.provides()
        if missing:
            raise ValueError(f"the stage-3 objective needs outputs {sorted(missing)}; the forward gave none")
        values: dict[str, Tensor] = {}
        total: Tensor | None = None
        for weight, term in self.terms():
            value = term.value(outputs, targets)
            if term.per_sample and reduction == "mean":
                value = value.mean(-1)
            elif not term.per_sample and reduction == "none":
                raise ValueError(
                    f"the {term.name!r} term couples the frames of a batch and has no per-frame value; "
                    "use PFTObjective.per_sample(...) (style_form 'reference_mean' or 'drop')"
                )
            values[term.name] = value
            total = weight * value if total is None else total + weight * value
        if total is None:  # nothing to train on: zero, still connected to T's outputs
            zero = 0.0 * outputs.logits_a.sum(-1)
            total = zero.mean(-1) if reduction == "mean" else zero
        return ObjectiveValue(total, values)
