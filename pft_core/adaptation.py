"""Target adaptation: ONE trainer (``AdaptationTrainer``) and small methods over it.

The trainer owns everything a method should not re-implement: the seeded generator of a run,
batching (frames drawn with replacement, each with a partner frame of the same person), the
optimiser over ``method.trainable_parameters(parts)`` only, ``requires_grad`` on exactly those,
train/eval modes, device placement, the loop, logging of the loss terms, convergence and timing,
and the seam for differential privacy (``privacy.make_private`` once before the loop and
``grad_hook`` after each backward pass). A method is a few lines: ``name``,
``trainable_parameters``, ``loss`` and ``predict``.

Methods here: ``SourceOnly`` (no training), ``PFTAdaptation`` (the paper's stage 3: only T on the
target's neutral frames) and ``Oracle`` (supervised fine-tuning of T and C, the upper bound).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from pft.core.config import FrozenConfig
from pft.core.errors import TooFewFacesError
from pft.core.losses import classification_loss
from pft.core.models import Classifier, FeatureExtractor, Translator
from pft.core.objective import PairOutputs, PFTObjective, ReferenceTargets
from pft.core.training import Progress, torch_threads


class AdaptConfig(FrozenConfig):
    """Settings of one adaptation run.

    Convergence (:class:`Convergence`, the one stop rule of the trainer and the batched engine):
    the loss is smoothed by an EMA, ``e_t = ema_beta * e_{t-1} + (1 - ema_beta) * loss_t``
    (``e_1 = loss_1``). The run stops at step t (counted from 1) once ``t >= min_iterations``,
    ``t > window`` and ``|e_t - e_{t-window}| <= tol * max(|e_{t-window}|, 1e-8)``, or at
    ``max_iterations``. ``AdaptResult.converged`` says which. ``num_threads`` intra-op threads
    are used during the run (1 is fastest for T's small MLP).
    """

    max_iterations: int = 60
    min_iterations: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    ema_beta: float = 0.8
    window: int = 10
    tol: float = 1e-3
    min_frames: int = 2
    num_threads: int | None = 1
    seed: int = 0
    device: str = "cpu"


class Convergence:
    """The stop rule of one run (see :class:`AdaptConfig`): feed it each step's loss.

    The trainer keeps one per run, the batched engine one per subject, so both stop a subject at
    the same step for the same losses.
    """

    def __init__(self, config: AdaptConfig) -> None:
        self.ema_beta = config.ema_beta
        self.window = config.window
        self.tol = config.tol
        self.min_iterations = config.min_iterations
        self.ema: list[float] = []

    @property
    def steps(self) -> int:
        """Losses observed so far."""
        return len(self.ema)

    def observe(self, loss: float) -> bool:
        """Record step ``steps + 1``'s loss; True when the smoothed loss has flattened (stop here)."""
        ema = self.ema
        ema.append(loss if not ema else self.ema_beta * ema[-1] + (1 - self.ema_beta) * loss)
        step = len(ema)
        if step < self.min_iterations or step <= self.window:
            return False
        before = ema[-1 - self.window]
        return abs(ema[-1] - before) <= self.tol * max(abs(before), 1e-8)


@dataclass
class ModelParts:
    """The model a method adapts: C always; T, F, style codes and an image generator G (the
    image-space methods, ``pft.core.image_translation``) where the method uses them.

    ``style_target`` is the person's normalised style code, ``style_reference`` the reference
    source subject's; ``targets`` what stage 3 pulls the person's frames toward (the reference's
    neutral pooled-feature mean and std).
    """

    classifier: Classifier
    translator: Translator | None = None
    extractor: FeatureExtractor | None = None
    style_target: Tensor | None = None
    style_reference: Tensor | None = None
    targets: ReferenceTargets | None = None
    generator: nn.Module | None = None

    def modules(self) -> list[nn.Module]:
        """The parts present, in the order G, F, T, C."""
        parts = (self.generator, self.extractor, self.translator, self.classifier)
        return [m for m in parts if m is not None]

    def to(self, device: torch.device) -> ModelParts:
        """Move modules (in place) and tensors to ``device``; returns self."""
        for m in self.modules():
            m.to(device)
        if self.style_target is not None:
            self.style_target = self.style_target.to(device)
        if self.style_reference is not None:
            self.style_reference = self.style_reference.to(device)
        if self.targets is not None:
            self.targets = self.targets.to(device)
        return self

    def with_translator(self, translator: Translator) -> ModelParts:
        """The same C, style codes and reference statistics with another T (and no F)."""
        return ModelParts(
            classifier=self.classifier,
            translator=translator,
            extractor=None,
            style_target=self.style_target,
            style_reference=self.style_reference,
            targets=self.targets,
        )

    def require_translation(self) -> tuple[Translator, Tensor, Tensor]:
        """T and the two style codes, or a clear error if one is missing."""
        if self.translator is None or self.style_target is None or self.style_reference is None:
            raise ValueError("this method needs ModelParts.translator, style_target and style_reference")
        return self.translator, self.style_target, self.style_reference


@dataclass
class Batch:
    """One sampled batch: frames ``features`` (B, D), a partner frame of the same person for each
    (``partner_features``), labels where known, the frame indices and the run's generator."""

    features: Tensor
    partner_features: Tensor
    labels: Tensor | None
    index: Tensor
    generator: torch.Generator


@dataclass
class AdaptationData:
    """One person's cached features.

    ``video_ids`` (N,) and ``time_index`` (N,) let a frame be paired with another frame of the
    same video at a different time; without them any other frame of the person is a partner.
    """

    features: Tensor
    labels: Tensor | None = None
    frame_stats: Tensor | None = None
    video_ids: Tensor | None = None
    time_index: Tensor | None = None
    _groups: list[Tensor] = field(default_factory=list, init=False, repr=False)
    _group_of: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.features)
        for name in ("labels", "frame_stats", "video_ids", "time_index"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"AdaptationData.{name} has {len(value)} rows, features {n}")
        vids = self.video_ids if self.video_ids is not None else torch.zeros(n, dtype=torch.long)
        uniq, inverse = torch.unique(vids, return_inverse=True)
        self._group_of = inverse
        self._groups = [torch.nonzero(inverse == g).flatten() for g in range(len(uniq))]

    def __len__(self) -> int:
        return len(self.features)

    def partners(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """For each frame, a random other frame of the same video (itself if it is alone);
        frames with the same ``time_index`` are avoided where another exists."""
        assert self._group_of is not None
        out = torch.empty_like(index)
        for k, i in enumerate(index.tolist()):
            group = self._groups[int(self._group_of[i])]
            if self.time_index is not None:
                other = group[self.time_index[group] != self.time_index[i]]
            else:
                other = group[group != i]
            if len(other) == 0:
                out[k] = i
            else:
                out[k] = other[int(torch.randint(len(other), (), generator=generator))]
        return out

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch:
        """A batch drawn with replacement, with partners."""
        index = torch.randint(len(self), (batch_size,), generator=generator)
        partner = self.partners(index, generator)
        labels = None if self.labels is None else self.labels[index].to(device)
        return Batch(
            self.features[index].to(device), self.features[partner].to(device), labels, index, generator
        )


class AdaptationMethod(Protocol):
    """What the trainer needs of a method."""

    @property
    def name(self) -> str:
        """Short name used in results."""
        ...

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """The parameters the method updates (possibly none)."""
        ...

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its named terms (for logging)."""
        ...

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """Logits (N, K) for features (N, D)."""
        ...


class PrivacyHook(Protocol):
    """Seam for differential privacy (e.g. Opacus): wraps the optimiser/parts before the loop."""

    def make_private(
        self, parts: ModelParts, optimizer: torch.optim.Optimizer, data: AdaptationData, config: AdaptConfig
    ) -> tuple[ModelParts, torch.optim.Optimizer]:
        """Return the (possibly wrapped) parts and optimiser to train with."""
        ...


GradHook = Callable[[list[nn.Parameter]], None]
"""Called with the trainable parameters after each backward pass, before the optimiser step."""


@dataclass
class AdaptResult:
    """What a run did: steps, whether it converged, wall time and the per-step loss terms."""

    method: str
    iterations: int
    converged: bool
    seconds: float
    history: dict[str, list[float]]

    @property
    def final_loss(self) -> float:
        """The last logged total loss (nan when nothing was trained)."""
        return self.history["loss"][-1] if self.history.get("loss") else float("nan")


class AdaptationTrainer:
    """The one loop every adaptation method runs on (see the module docstring)."""

    def __init__(
        self, config: AdaptConfig, privacy: PrivacyHook | None = None, grad_hook: GradHook | None = None
    ) -> None:
        self.config = config
        self.privacy = privacy
        self.grad_hook = grad_hook

    def fit(
        self,
        method: AdaptationMethod,
        parts: ModelParts,
        data: AdaptationData,
        progress: Progress | None = None,
    ) -> AdaptResult:
        """Adapt ``parts`` IN PLACE with ``method`` on ``data``; every module ends in eval mode."""
        cfg = self.config
        device = torch.device(cfg.device)
        parts.to(device)
        params = method.trainable_parameters(parts)
        all_params = [p for m in parts.modules() for p in m.parameters()]
        owned = {id(p) for p in all_params}
        if any(id(p) not in owned for p in params):
            raise ValueError(f"{method.name}: trainable parameters must belong to the given parts")
        if not params:
            for m in parts.modules():
                m.eval()
            return AdaptResult(method.name, 0, True, 0.0, {})
        if len(data) < cfg.min_frames:
            raise TooFewFacesError(len(data), cfg.min_frames)
        trainable = {id(p) for p in params}
        saved = [(p, p.requires_grad) for p in all_params]
        history: dict[str, list[float]] = {}
        converged = False
        steps = 0
        t0 = time.perf_counter()
        try:
            for p in all_params:
                p.requires_grad_(id(p) in trainable)
            for m in parts.modules():  # frozen parts in eval mode (BatchNorm statistics, dropout)
                m.train(any(id(p) in trainable for p in m.parameters()))
            with torch.random.fork_rng(devices=[]), torch_threads(cfg.num_threads):
                torch.manual_seed(cfg.seed)
                gen = torch.Generator().manual_seed(cfg.seed)
                opt = self._optimizer(params)
                run_parts = parts
                if self.privacy is not None:
                    run_parts, opt = self.privacy.make_private(parts, opt, data, cfg)
                stop = Convergence(cfg)
                for step in range(1, cfg.max_iterations + 1):
                    batch = data.sample(cfg.batch_size, gen, device)
                    loss, terms = method.loss(run_parts, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.grad_hook is not None:
                        self.grad_hook(params)
                    opt.step()
                    steps = step
                    value = float(loss.detach())
                    history.setdefault("loss", []).append(value)
                    for k, v in terms.items():
                        history.setdefault(k, []).append(v)
                    if progress is not None:
                        progress(step, cfg.max_iterations, {"loss": value})
                    if stop.observe(value):
                        converged = True
                        break
        finally:
            for p, r in saved:
                p.requires_grad_(r)
            for m in parts.modules():
                m.eval()
        return AdaptResult(method.name, steps, converged, time.perf_counter() - t0, history)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict(method: AdaptationMethod, parts: ModelParts, features: Tensor) -> Tensor:
    """Logits of ``method`` for features (N, D), with every part in eval mode."""
    for m in parts.modules():
        m.eval()
    return method.predict(parts, features)


# --- methods -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceOnly:
    """No adaptation: ``C(f)``."""

    name: str = "source_only"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """None."""
        return []

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Source-only trains nothing."""
        raise RuntimeError("SourceOnly has no loss; it trains nothing")

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(f)``."""
        return parts.classifier(features)


def _translated_logits(parts: ModelParts, features: Tensor) -> Tensor:
    translator, s_t, s_r = parts.require_translation()
    return parts.classifier(translator(features, s_t, s_r))


@dataclass(frozen=True)
class PFTAdaptation:
    """Stage 3 of SFDA-PFT: adapt only T (its output bias, or its last ``last_layers`` groups) on
    the person's NEUTRAL frames with the stage-3 objective (:class:`pft.core.objective.PFTObjective`).

    The settings have no defaults here: the shipped ones are ``PFTObjective()``'s and
    :class:`pft.core.personalize.PersonalizeConfig`'s (``PersonalizeConfig().method()``).
    ``bias_only`` adapts only T's output bias - a per-person shift in feature space that cannot
    fold expressive frames onto neutral ones (adapting all of T on neutral frames collapses every
    prediction to neutral; docs/method.md). F and C stay frozen.
    """

    objective: PFTObjective
    bias_only: bool
    last_layers: int | None
    name: str = "pft"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """T's parameters: its output bias with ``bias_only``, else its last ``last_layers`` groups
        (all when ``None``)."""
        translator, _, _ = parts.require_translation()
        if self.bias_only:
            return [translator.out.bias]
        return translator.last_layers_parameters(self.last_layers)

    def pair_outputs(self, parts: ModelParts, batch: Batch) -> PairOutputs:
        """The forward the objective reads, for a batch: ``T(f_a)``, ``C(T(f_a))`` and the
        (gradient-free) consistency target ``C(T(f_b + noise))`` or ``C(f_b + noise)``.

        The partner noise is drawn from the batch's generator (after the batch itself); style
        codes are expanded to one row per frame, so every layer of T sees a batch dimension
        (per-sample gradients)."""
        translator, s_t, s_r = parts.require_translation()
        objective = self.objective
        n = len(batch.features)
        s_t_rows, s_r_rows = s_t.reshape(1, -1).expand(n, -1), s_r.reshape(1, -1).expand(n, -1)
        f_a_hat = translator(batch.features, s_t_rows, s_r_rows)
        logits_a = parts.classifier(f_a_hat)
        f_b = batch.partner_features
        if objective.noise_std > 0:
            noise = torch.randn(f_b.shape, generator=batch.generator).to(f_b.device)
            f_b = f_b + objective.noise_std * noise
        with torch.no_grad():
            logits_b = (
                parts.classifier(translator(f_b, s_t_rows, s_r_rows))
                if objective.consistency_target == "translated"
                else parts.classifier(f_b)
            )
        return PairOutputs(logits_a, logits_b, translated_a=f_a_hat)

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The stage-3 objective on one batch of neutral frames (mean over the batch)."""
        total, terms = self.objective.evaluate(self.pair_outputs(parts, batch), parts.targets, "mean")
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f, s_target, s_reference))``."""
        return _translated_logits(parts, features)


@dataclass(frozen=True)
class Oracle:
    """Upper bound: supervised fine-tuning of T and C (``C`` only without T) on labelled frames."""

    name: str = "oracle"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """T's and C's parameters."""
        mods = [m for m in (parts.translator, parts.classifier) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on the labelled batch."""
        if batch.labels is None:
            raise ValueError("Oracle needs labelled data (AdaptationData.labels)")
        ce = classification_loss(self.predict(parts, batch.features), batch.labels)
        return ce, {"ce": float(ce.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))`` (``C(f)`` without T)."""
        if parts.translator is None:
            return parts.classifier(features)
        return _translated_logits(parts, features)


@dataclass(frozen=True)
class TranslatorSupervision:
    """T trained with cross-entropy of ``C(T(f))`` on LABELLED features, C frozen: all of T, or
    with ``bias_only`` its output bias alone (the parameters of bias-only stage 3).

    Used by DSFDA's adaptation stage (``name="dsfda"``: the person's neutral frames and generated
    non-neutral ones) and by the ``oracle_bias`` upper bound (``bias_only``: the person's labelled
    frames of every class; ``pft.core.methods.run_oracle_bias``).
    """

    name: str = "dsfda"
    bias_only: bool = False

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """T's output bias with ``bias_only``, else all of T's parameters."""
        translator, _, _ = parts.require_translation()
        return [translator.out.bias] if self.bias_only else list(translator.parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on the batch's labels."""
        if batch.labels is None:
            raise ValueError(f"{self.name} needs labelled features (AdaptationData.labels)")
        ce = classification_loss(self.predict(parts, batch.features), batch.labels)
        return ce, {"ce": float(ce.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))``."""
        return _translated_logits(parts, features)


def adapt_translator(
    parts: ModelParts,
    neutral_features: Tensor,
    config: AdaptConfig,
    method: PFTAdaptation,
    video_ids: Tensor | None = None,
    time_index: Tensor | None = None,
    progress: Progress | None = None,
) -> tuple[Translator, AdaptResult]:
    """Stage 3 on a COPY of ``parts.translator``: returns the personalised T and the run's result.

    ``parts`` itself is left untouched (the base T0 can serve other people).
    """
    translator, _, _ = parts.require_translation()
    personal = copy.deepcopy(translator)
    run_parts = parts.with_translator(personal)
    data = AdaptationData(features=neutral_features, video_ids=video_ids, time_index=time_index)
    result = AdaptationTrainer(config).fit(method, run_parts, data, progress)
    return personal, result
