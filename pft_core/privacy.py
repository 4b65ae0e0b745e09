"""Differential privacy for stage 3: Opacus DP-SGD on the translator T, accounting, privacy units.

What is protected: the person's adaptation frames (or clips) against inference from what the
adaptation releases (metrics, or an update in the opt-in federated prior). T itself never leaves
the device unless the user opted in. See ``docs/privacy.md`` for the guarantee of each unit.

Pieces, all over the ONE :class:`~pft.core.adaptation.AdaptationTrainer`:

- :class:`DPConfig` - target epsilon (noise found with Opacus's ``get_noise_multiplier``) or a
  noise multiplier, delta, clipping norm, accountant (``rdp``/``prv``), privacy unit.
- :class:`RecordSampledData` - an :class:`~pft.core.adaptation.AdaptationData` whose ``sample``
  is real Poisson sampling of RECORDS (frames, clips or the whole person): each record is in a
  step's batch independently with probability ``q``; a record's partner frames come from the
  record itself, so one record's gradient depends on that record only.
- :class:`DPPFTAdaptation` - the PFT loss made per-sample decomposable (the batch style term is
  replaced by each translated feature's squared distance to the reference mean, or dropped).
- :class:`OpacusPrivacyHook` - ``make_private`` wraps T in Opacus's ``GradSampleModule`` and the
  optimiser in ``DPOptimizer`` (clip per record, Gaussian noise, seeded); ``grad_hook`` turns
  per-frame gradients into per-record gradients (mean over the record's frames).
- :func:`epsilon_spent`, :func:`noise_for_target`, :func:`group_privacy`, :func:`plan_release`,
  :func:`adapt_translator_private`.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from pft.core.adaptation import (
    AdaptationData,
    AdaptationTrainer,
    AdaptConfig,
    AdaptResult,
    Batch,
    ModelParts,
    PFTAdaptation,
)
from pft.core.config import FrozenConfig
from pft.core.models import Translator
from pft.core.objective import PFTObjective
from pft.core.training import Progress

if TYPE_CHECKING:  # Opacus is the `dp` extra: imported where DP runs, not with this module
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

PrivacyUnit = Literal["frame", "video", "person"]
AccountantName = Literal["rdp", "prv"]
Mechanism = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)`` - one entry of an Opacus accountant's history."""

__all__ = [
    "AccountantName",
    "DPConfig",
    "DPPFTAdaptation",
    "DPRelease",
    "OpacusPrivacyHook",
    "PrivacyUnit",
    "RecordSampledData",
    "adapt_translator_private",
    "epsilon_spent",
    "group_privacy",
    "noise_for_target",
    "plan_release",
    "strip_module_prefix",
    "summarise_releases",
]


class DPConfig(FrozenConfig):
    """DP-SGD settings of one adaptation run.

    Give EITHER ``epsilon`` (the run's target; the noise multiplier is found by Opacus's
    accountant for the run's sample rate and steps) OR ``noise_multiplier`` (0 = clipping only,
    epsilon infinite).

    Attributes
    ----------
    privacy_unit:
        The record DP protects: ``frame`` (one face frame), ``video`` (one clip: all its frames
        together) or ``person`` (everything on the device is one record; see docs/privacy.md).
    sample_rate:
        Poisson rate q of records per step; default ``min(1, batch_size / N)`` for frames and
        ``min(1, batch_size / (frames_per_record * N))`` for clips (N records), 1 for a person.
    frames_per_record:
        Frames drawn (without replacement, inside the record) when a clip or the person is in a
        batch; the record's gradient is the mean over them.
    steps:
        DP-SGD steps (fixed: no data-dependent early stop); default ``adapt.max_iterations``.
    style_term:
        ``reference_mean``: ``||T(f_a) - mu_ref||^2`` per frame replaces the batch style loss
        (same gradient for T's output bias as the batch term); ``drop``: no style term.
    """

    epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    noise_multiplier: float | None = Field(None, ge=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    accountant: AccountantName = "rdp"
    privacy_unit: PrivacyUnit = "frame"
    sample_rate: float | None = Field(None, gt=0, le=1)
    frames_per_record: int = Field(16, ge=1)
    steps: int | None = Field(None, ge=1)
    style_term: Literal["reference_mean", "drop"] = "reference_mean"

    @model_validator(mode="after")
    def _one_of_epsilon_or_noise(self) -> DPConfig:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("DPConfig needs exactly one of `epsilon` (a target) or `noise_multiplier`")
        return self


class DPRelease(FrozenConfig):
    """One DP release: the mechanism run and what it costs, stated with its privacy unit.

    ``epsilon`` is this release alone at ``delta``. ``group_size`` is the most frames one clip
    contributes; for the ``frame`` unit, ``group_epsilon``/``group_delta`` is the group-privacy
    bound for a whole clip (``k * eps``, ``k * exp((k - 1) eps) * delta``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: AccountantName
    privacy_unit: PrivacyUnit
    records: int
    epsilon: float
    group_size: int = 1
    group_epsilon: float | None = None
    group_delta: float | None = None

    @property
    def mechanism(self) -> Mechanism:
        """``(noise_multiplier, sample_rate, steps)`` for an accountant's history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields for results and reports (always names the privacy unit)."""
        return self.model_dump(mode="json")


# --- accounting ------------------------------------------------------------------------------------
def epsilon_spent(history: Sequence[Mechanism], delta: float, accountant: AccountantName = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of every mechanism in ``history`` (Opacus accountant).

    The whole history is handed to ONE accountant (RDP composes orders additively; PRV composes
    the privacy-loss distributions), which is tighter than summing per-release epsilons. Returns
    0 for an empty history and ``inf`` when any step had no noise.
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:  # identical mechanisms self-compose: (s, q, a) + (s, q, b) = (s, q, a + b)
        if n > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    if not merged:
        return 0.0
    if any(s <= 0 for s, _ in merged):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(s, q, n) for (s, q), n in merged.items()]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)  # a pure function; planning and running ask twice
def noise_for_target(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName = "rdp"
) -> float:
    """The noise multiplier for which ``steps`` steps at ``sample_rate`` spend ``epsilon`` at ``delta``
    (Opacus's ``get_noise_multiplier`` binary search; the result spends at most ``epsilon``)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for groups of ``k`` records: ``(k eps, k exp((k - 1) eps) delta)``.

    The delta bound can exceed 1 (then it says nothing); it is reported as computed, capped at 1.
    """
    if k <= 1:
        return epsilon, delta
    if math.isinf(epsilon):
        return math.inf, 1.0
    log_d = math.log(k) + (k - 1) * epsilon + math.log(delta)
    return k * epsilon, 1.0 if log_d >= 0 else math.exp(log_d)


# --- records and Poisson sampling ------------------------------------------------------------------
def _record_rows(n: int, video_ids: Tensor | None, unit: PrivacyUnit) -> list[Tensor]:
    if unit == "frame":
        return [torch.tensor([i]) for i in range(n)]
    if unit == "person":
        return [torch.arange(n)]
    vids = video_ids if video_ids is not None else torch.zeros(n, dtype=torch.long)
    uniq = torch.unique(vids)
    return [torch.nonzero(vids == v).flatten() for v in uniq]


class RecordSampledData(AdaptationData):
    """Adaptation frames grouped into privacy records, sampled the Poisson way.

    ``sample`` puts each record in the batch independently with probability ``sample_rate``
    (so a batch can be empty), then draws up to ``frames_per_record`` of its frames without
    replacement. Partner frames stay inside the record: itself (with the method's feature noise)
    for a frame, another frame of the same clip for a clip or the person. ``last_record`` maps
    each row of the latest batch to its record's slot (0..R-1) for :class:`OpacusPrivacyHook`.
    """

    def __init__(
        self,
        features: Tensor,
        unit: PrivacyUnit,
        sample_rate: float,
        frames_per_record: int,
        video_ids: Tensor | None = None,
        time_index: Tensor | None = None,
    ) -> None:
        super().__init__(features=features, video_ids=video_ids, time_index=time_index)
        self.unit: PrivacyUnit = unit
        self.sample_rate = float(sample_rate)
        self.frames_per_record = 1 if unit == "frame" else int(frames_per_record)
        self.records = _record_rows(len(features), video_ids, unit)
        self.last_record = torch.zeros(0, dtype=torch.long)

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch:
        """One Poisson-sampled batch (``batch_size`` is ignored: the rate decides the size)."""
        chosen = torch.nonzero(
            torch.rand(len(self.records), generator=generator) < self.sample_rate
        ).flatten()
        rows: list[Tensor] = []
        slots: list[Tensor] = []
        for slot, r in enumerate(chosen.tolist()):
            members = self.records[r]
            if len(members) > self.frames_per_record:
                members = members[torch.randperm(len(members), generator=generator)[: self.frames_per_record]]
            rows.append(members)
            slots.append(torch.full((len(members),), slot, dtype=torch.long))
        index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        self.last_record = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
        partner = index if self.unit == "frame" else self.partners(index, generator)
        return Batch(
            self.features[index].to(device), self.features[partner].to(device), None, index, generator
        )


# --- the per-sample PFT loss -----------------------------------------------------------------------
@dataclass(frozen=True)
class DPPFTAdaptation:
    """PFT stage 3 with a per-sample decomposable loss (for DP-SGD): the same objective, one value
    per frame (``PFTObjective.evaluate(..., reduction="none")``); the batch loss is their mean.

    Per frame a: ``l_a = lambda_c KL(stopgrad p_b || p_a) + lambda_s ||T(f_a) - mu_ref||^2 +
    lambda_n CE_smooth(C(T(f_a)), neutral)``. The batch style term of :class:`PFTAdaptation`
    matches the batch's mean AND std to the reference, which couples frames; here it takes its
    per-frame form (``PFTObjective.per_sample``): only the mean-matching part survives (for T's
    output bias its gradient equals the batch term's, since a shift does not change a std) and,
    for a full T, the frame's spread around ``mu_ref`` is also penalised. ``style_term="drop"``
    removes it.
    """

    base: PFTAdaptation
    style_term: Literal["reference_mean", "drop"] = "reference_mean"

    @property
    def name(self) -> str:
        """The base method's name (results compare it with the non-private run)."""
        return self.base.name

    @property
    def objective(self) -> PFTObjective:
        """The base objective with every term per frame."""
        return self.base.objective.per_sample(self.style_term)

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """Those of the base method."""
        return self.base.trainable_parameters(parts)

    def per_sample_losses(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-frame losses ``l_a`` (B,) and their per-frame terms."""
        outputs = self.base.pair_outputs(parts, batch)
        total, terms = self.objective.evaluate(outputs, parts.targets, reduction="none")
        return total, terms

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Mean of the per-frame losses (0, still on the graph, for an empty Poisson batch)."""
        per, terms = self.per_sample_losses(parts, batch)
        if len(per) == 0:
            return per.sum(), {}
        return per.mean(), {k: float(v.detach().mean()) for k, v in terms.items()}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))`` as the base method."""
        return self.base.predict(parts, features)


# --- the Opacus hook -------------------------------------------------------------------------------
class OpacusPrivacyHook:
    """The trainer's DP seam backed by Opacus (a fresh ``GradSampleModule``/``DPOptimizer`` per run).

    ``make_private`` wraps T (already in train mode; F and C stay frozen in eval mode) and the
    optimiser; ``grad_hook`` averages per-frame gradients into per-record gradients before the
    DP optimiser clips each record to ``max_grad_norm``, adds ``N(0, (sigma C)^2)`` noise from a
    seeded generator and divides by the expected number of records per batch.
    """

    def __init__(self, release: DPRelease, data: RecordSampledData, seed: int) -> None:
        self.release = release
        self.data = data
        self.seed = seed
        self.module: GradSampleModule | None = None
        self.optimizer: DPOptimizer | None = None
        self.steps = 0

    def make_private(
        self, parts: ModelParts, optimizer: torch.optim.Optimizer, data: AdaptationData, config: AdaptConfig
    ) -> tuple[ModelParts, torch.optim.Optimizer]:
        """Wrap T in a ``GradSampleModule`` and the optimiser in a ``DPOptimizer``."""
        if data is not self.data:
            raise ValueError("OpacusPrivacyHook must train on the RecordSampledData it was made with")
        translator = parts.translator
        if translator is None:
            raise ValueError("DP adaptation needs ModelParts.translator")
        for m in (parts.extractor, parts.classifier):
            if m is not None and (m.training or any(p.requires_grad for p in m.parameters())):
                raise ValueError("F and C must be frozen and in eval mode for DP adaptation")
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        translator.train()
        self.module = GradSampleModule(translator, batch_first=True, loss_reduction="mean", strict=True)
        expected = self.release.sample_rate * len(self.data.records)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.release.noise_multiplier,
            max_grad_norm=self.release.max_grad_norm,
            expected_batch_size=cast(int, expected),  # a float is fine: it only divides
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(self.seed + 7919),
        )
        self.optimizer.attach_step_hook(self._count_step)
        wrapped = ModelParts(
            classifier=parts.classifier,
            translator=cast(Translator, self.module),
            extractor=parts.extractor,
            style_target=parts.style_target,
            style_reference=parts.style_reference,
            targets=parts.targets,
        )
        return wrapped, self.optimizer

    def _count_step(self, _optimizer: DPOptimizer) -> None:
        self.steps += 1

    def grad_hook(self, params: list[nn.Parameter]) -> None:
        """Per-frame ``grad_sample`` rows -> one row per sampled record (mean over its frames)."""
        slots = self.data.last_record
        records = int(slots.max()) + 1 if len(slots) else 0
        for p in params:
            gs = getattr(p, "grad_sample", None)
            if gs is None or len(gs) != len(slots):
                gs = torch.zeros((len(slots), *p.shape), dtype=p.dtype, device=p.device)
            if self.data.unit == "frame":
                p.grad_sample = gs  # type: ignore[attr-defined]
                continue
            summed = torch.zeros((records, *p.shape), dtype=gs.dtype, device=gs.device)
            summed.index_add_(0, slots.to(gs.device), gs)
            counts = torch.bincount(slots, minlength=records).clamp(min=1).to(gs.dtype).to(gs.device)
            p.grad_sample = summed / counts.reshape(-1, *([1] * p.dim()))  # type: ignore[attr-defined]

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample buffers; T is a plain module again."""
        if self.module is not None:
            self.module.remove_hooks()
            for p in self.module._module.parameters():
                for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
            self.module = None


def strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of a ``GradSampleModule`` with Opacus's ``_module.`` prefix removed."""
    return {k.removeprefix("_module."): v for k, v in state_dict.items()}


# --- planning and running --------------------------------------------------------------------------
def _default_rate(dp: DPConfig, adapt: AdaptConfig, records: int) -> float:
    if dp.sample_rate is not None:
        return dp.sample_rate
    if dp.privacy_unit == "person":
        return 1.0
    per_record = 1 if dp.privacy_unit == "frame" else dp.frames_per_record
    return min(1.0, adapt.batch_size / (per_record * records))


def plan_release(
    dp: DPConfig, adapt: AdaptConfig, n_frames: int, video_ids: Tensor | None = None
) -> DPRelease:
    """The release a DP run on ``n_frames`` frames (clips ``video_ids``) will be, before running it.

    Fixes the records, the Poisson rate, the steps and the noise multiplier (from the target
    epsilon when one is given) and computes the run's epsilon with the configured accountant.
    """
    records = len(_record_rows(n_frames, video_ids, dp.privacy_unit))
    q = _default_rate(dp, adapt, records)
    steps = dp.steps if dp.steps is not None else adapt.max_iterations
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        assert dp.epsilon is not None
        sigma = noise_for_target(dp.epsilon, dp.delta, q, steps, dp.accountant)
    eps = epsilon_spent([(sigma, q, steps)], dp.delta, dp.accountant)
    vids = video_ids if video_ids is not None else torch.zeros(n_frames, dtype=torch.long)
    k = int(torch.bincount(torch.unique(vids, return_inverse=True)[1]).max()) if n_frames else 1
    group = dp.privacy_unit == "frame" and k > 1
    g_eps, g_delta = group_privacy(eps, dp.delta, k) if group else (None, None)
    return DPRelease(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        delta=dp.delta,
        max_grad_norm=dp.max_grad_norm,
        accountant=dp.accountant,
        privacy_unit=dp.privacy_unit,
        records=records,
        epsilon=eps,
        group_size=k if group else 1,
        group_epsilon=g_eps,
        group_delta=g_delta,
    )


def adapt_translator_private(
    parts: ModelParts,
    neutral_features: Tensor,
    config: AdaptConfig,
    method: PFTAdaptation,
    dp: DPConfig,
    video_ids: Tensor | None = None,
    time_index: Tensor | None = None,
    progress: Progress | None = None,
) -> tuple[Translator, AdaptResult, DPRelease]:
    """Stage 3 with DP-SGD on a COPY of ``parts.translator`` (like ``adapt_translator``).

    Runs exactly ``release.steps`` steps (no early stop: a data-dependent stop would leak) on the
    one trainer with :class:`OpacusPrivacyHook`. The returned ``AdaptResult.history`` holds the
    non-private training loss: it stays on the device and is not part of the release.
    """
    translator, _, _ = parts.require_translation()
    release = plan_release(dp, config, len(neutral_features), video_ids)
    personal = copy.deepcopy(translator)
    run_parts = parts.with_translator(personal)
    data = RecordSampledData(
        neutral_features, dp.privacy_unit, release.sample_rate, dp.frames_per_record, video_ids, time_index
    )
    fixed = config.model_copy(update={"max_iterations": release.steps, "min_iterations": release.steps})
    hook = OpacusPrivacyHook(release, data, config.seed)
    try:
        with warnings.catch_warnings():  # cached features need no input gradient; Opacus's hook says so
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = AdaptationTrainer(fixed, privacy=hook, grad_hook=hook.grad_hook).fit(
                DPPFTAdaptation(method, dp.style_term), run_parts, data, progress
            )
    finally:
        hook.close()
    if hook.steps != release.steps:
        raise RuntimeError(f"DP adaptation took {hook.steps} noisy steps, planned {release.steps}")
    personal.eval()
    return personal, result, release


def summarise_releases(releases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One method's DP releases over subjects (``subject -> DPRelease.summary()``) for results.json.

    Each subject is a different device and person, so the guarantee is per subject: ``epsilon``
    is the largest any subject spent (at ``delta``, for ``privacy_unit``, by ``accountant``).
    """
    if not releases:
        return {}
    rows = list(releases.values())
    first = rows[0]
    worst_group = [r["group_epsilon"] for r in rows if r.get("group_epsilon") is not None]
    return {
        "privacy_unit": first["privacy_unit"],
        "accountant": first["accountant"],
        "delta": first["delta"],
        "epsilon": max(r["epsilon"] for r in rows),
        "noise_multiplier": [
            min(r["noise_multiplier"] for r in rows),
            max(r["noise_multiplier"] for r in rows),
        ],
        "sample_rate": [min(r["sample_rate"] for r in rows), max(r["sample_rate"] for r in rows)],
        "steps": first["steps"],
        "max_grad_norm": first["max_grad_norm"],
        "group_epsilon": max(worst_group) if worst_group else None,
        "group_size": max(r.get("group_size", 1) for r in rows),
        "per_subject": {s: r["epsilon"] for s, r in releases.items()},
    }
