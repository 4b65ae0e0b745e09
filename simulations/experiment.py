"""The SFDA-PFT experiment (``pft simulate``): per-subject personalisation on a cohort.

Stages: make (or reuse) the cohort -> decode and crop every video once (cached) -> stage 1, the
source model F and C (cached by config hash) -> F's features for every frame (cached) -> stage 2,
T pre-trained on pairs of source subjects (cached) -> for each target subject and method: adapt on
that subject's data only (PFT: its NEUTRAL ``adapt`` videos) and evaluate on its held-out ``eval``
videos -> results.json, report.md, plots and the resolved config in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor

from pft.core.bundle import load_bundle, save_bundle
from pft.core.cohort import BUILTIN_PROFILES, CohortConfig, get_profile, known_profile, load_manifest
from pft.core.config import FrozenConfig
from pft.core.data import DatasetIndex, FaceCropConfig, VideoConfig, VideoRecord
from pft.core.data.cache import state_dict_sha256
from pft.core.data.split import DataSource
from pft.core.domain import TrainingDomain
from pft.core.frames import FrameSet, FrameStore
from pft.core.machine import describe_machine
from pft.core.methods import (
    METHODS,
    MethodOutcome,
    MethodSettings,
    TargetData,
    method_input,
    method_names,
    needs_images,
    target_images,
)
from pft.core.metrics import accuracy, confusion_matrix, macro_f1
from pft.core.models import Classifier, FeatureExtractor, ModelConfig
from pft.core.pairing import Strategy
from pft.core.personalize import SourceModel
from pft.core.privacy import summarise_releases
from pft.core.results import markdown_table, plot_per_subject, summarise_method, write_results
from pft.core.safe_weights import load_safetensors, save_safetensors
from pft.core.seeding import subject_seed
from pft.core.training import (
    SourceStyles,
    SourceTrainConfig,
    SubjectFeatures,
    TranslatorPretrainConfig,
    pretrain_translator,
    train_source,
)
from pft.simulations.analysis import analyse_runs, dp_description, statistics_markdown, summary_lines
from pft.simulations.batched import BatchedConfig, run_pft_batched
from pft.simulations.cluster import PieceReport
from pft.simulations.embedding import plot_embedding
from pft.simulations.gap_analysis import SubjectGap, markdown_correlations, plot_gaps, subject_gaps
from pft.simulations.workspace import default_cache_root, ensure_cohort, experiment_index

#: a cohort profile's name: a built-in one or one registered (``pft.core.cohort.register_profile``)
Profile = str
#: the built-in profiles (what ``--profile all`` runs); :func:`pft.core.cohort.profile_names` has
#: the registered ones too
PROFILES: tuple[Profile, ...] = BUILTIN_PROFILES
DEFAULT_METHODS: tuple[str, ...] = ("source_only", "pft", "oracle")


class ExperimentConfig(FrozenConfig):
    """Everything that defines one run of ``pft simulate``; the top-level ``seed`` seeds every stage.

    Nested seeds are derived from ``seed`` by :meth:`resolved` (cohort = seed, stage 1 = seed,
    stage 2 = seed, adaptation of target k = ``subject_seed(seed, k)``), and the resolved config is written
    beside the results.
    """

    profile: Profile = "biovid"
    seed: int = Field(0, ge=0)
    source_subjects: int | None = Field(None, ge=2)
    target_subjects: int | None = Field(None, ge=1)
    methods: tuple[str, ...] = DEFAULT_METHODS
    engine: Literal["loop", "flower", "batched"] = "loop"
    batched: BatchedConfig = BatchedConfig()
    cohort: CohortConfig = CohortConfig()
    video: VideoConfig = VideoConfig()
    crop: FaceCropConfig = FaceCropConfig(margin=0.0)
    model: ModelConfig = ModelConfig()
    source_train: SourceTrainConfig = SourceTrainConfig(epochs=None)
    """Stage 1; ``epochs=None`` takes the profile's ``source_epochs`` (12; bah 20) in :meth:`resolved`."""
    pretrain: TranslatorPretrainConfig = TranslatorPretrainConfig()
    settings: MethodSettings = MethodSettings()
    embedding_plot: bool = True
    data: DataSource | None = None
    """A real dataset folder instead of the synthetic cohort (``pft simulate --data``)."""

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        return known_profile(value)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = tuple(METHODS)
        if any(m not in known for m in value):
            known = method_names()  # the registered methods too (entry points read)
        unknown = [m for m in value if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(known)}")
        if not value:
            raise ValueError("at least one method is needed")
        return tuple(dict.fromkeys(value))

    @property
    def source_epochs(self) -> int:
        """Stage 1's epochs: ``source_train.epochs``, or the profile's ``source_epochs`` when it is None."""
        given = self.source_train.epochs
        return given if given is not None else get_profile(self.profile).source_epochs

    def resolved(self) -> ExperimentConfig:
        """This config with the cohort and the stage seeds derived from the top-level fields."""
        cohort = self.cohort.model_copy(
            update={
                "profile": self.profile,
                "seed": self.seed,
                "source_subjects": self.source_subjects,
                "target_subjects": self.target_subjects,
            }
        )
        return self.model_copy(
            update={
                "cohort": CohortConfig.model_validate(cohort.model_dump()),
                "source_train": self.source_train.model_copy(
                    update={"seed": self.seed, "epochs": self.source_epochs}
                ),
                "pretrain": self.pretrain.model_copy(update={"seed": self.seed}),
                "settings": self.settings.with_defaults(self.methods).model_copy(update={"seed": self.seed}),
                "data": None if self.data is None else self.data.with_seed(self.seed),
            }
        )


ProgressFactory = Callable[[str, int], Callable[[int, int], None]]
"""``factory(stage description, total) -> step(done, total)``; the CLI makes rich progress bars."""


def _silent(_desc: str, _total: int) -> Callable[[int, int], None]:
    return lambda _d, _t: None


@dataclass
class ExperimentResult:
    """What ``run_experiment`` returns: the results dict and where the outputs are."""

    results: dict[str, Any]
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A summary: PFT vs source-only (and the oracle), subjects won, where to look; then the CIs,
        the paired test against source-only, DP (if any) and the warnings, one line each."""
        methods = self.results["methods"]
        parts = [f"{self.results['profile']} seed {self.results['seed']}:"]
        for name, entry in methods.items():
            parts.append(f"{name} {entry['mean_f1']:.1f}")
        if "pft" in methods and "source_only" in methods:
            pft, src = methods["pft"], methods["source_only"]
            wins = sum(pft["per_subject"][s]["f1"] > src["per_subject"][s]["f1"] for s in pft["per_subject"])
            parts.append(
                f"| pft - source_only = {pft['mean_f1'] - src['mean_f1']:+.1f} F1, "
                f"better on {wins}/{len(pft['per_subject'])} subjects"
            )
        parts.append(f"| {self.out_dir}")
        # the CI over subjects, the paired test, DP and the checks' warnings (pft.simulations.analysis)
        return "\n".join([" ".join(parts), *summary_lines(analyse_runs([self.results]))])


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 2)


def _load_or_train_source(
    config: ExperimentConfig,
    store: FrameStore,
    index: DatasetIndex,
    model_config: ModelConfig,
    cache_root: Path,
    progress: ProgressFactory,
) -> tuple[FeatureExtractor, Classifier, Path]:
    """Stage 1, cached under ``models/source-<hash>`` by (cohort, crops, model, training) config."""
    blob = json.dumps(
        [
            config.cohort.model_dump(mode="json"),
            config.cohort.config_hash(),  # carries the generator version
            config.video.model_dump(mode="json"),
            config.crop.model_dump(mode="json"),
            model_config.model_dump(mode="json"),
            config.source_train.model_dump(mode="json"),
            *([config.data.model_dump(mode="json")] if config.data is not None else []),
        ],
        sort_keys=True,
    )
    folder = cache_root / "models" / f"source-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    extractor, classifier = FeatureExtractor(model_config), Classifier(model_config)
    if (folder / "F.safetensors").is_file() and (folder / "C.safetensors").is_file():
        extractor.load_state_dict(load_safetensors(folder / "F.safetensors"))
        classifier.load_state_dict(load_safetensors(folder / "C.safetensors"))
        extractor.eval()
        classifier.eval()
        return extractor, classifier, folder
    source_records = list(index.filter(role="source", split="train").records)
    images, labels = store.crops_and_labels(source_records)
    actions = store.annotated_actions(source_records) if config.source_train.lambda_actions > 0 else None
    step = progress("stage 1: source model F, C", config.source_epochs)
    extractor, classifier, history = train_source(
        images, labels, model_config, config.source_train, lambda e, n, _i: step(e, n), actions
    )
    save_safetensors(classifier.state_dict(), folder / "C.safetensors")
    save_safetensors(extractor.state_dict(), folder / "F.safetensors")
    (folder / "history.json").write_text(json.dumps(_jsonable(history), indent=1))
    return extractor, classifier, folder


def experiment_domain(config: ExperimentConfig, classes: list[str], model: ModelConfig) -> TrainingDomain:
    """What the experiment's bundle was trained on: the synthetic profile or the dataset folder."""
    if config.data is None:
        return TrainingDomain.for_model("synthetic", f"synthetic:{config.profile}", classes, model)
    return TrainingDomain.for_model("real", f"{config.data.layout}:{config.data.root.name}", classes, model)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if isinstance(value, Tensor | np.ndarray):
        return np.asarray(value).tolist()
    return str(value)


def _subject_features(frames: FrameSet) -> SubjectFeatures:
    desc = frames.select(frames.labels == 0).mean_descriptor()
    return SubjectFeatures(frames.features, frames.frame_stats, frames.labels, 0, desc)


def _source_descriptors(subjects: Mapping[str, SubjectFeatures], strategy: Strategy) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, s in subjects.items():
        if strategy == "landmark":
            if s.descriptor is not None:
                out[name] = np.asarray(s.descriptor)
        else:
            out[name] = s.features[s.neutral_mask].double().mean(0).numpy()
    return out


def _load_or_pretrain_translator(
    config: ExperimentConfig,
    source_dir: Path,
    extractor: FeatureExtractor,
    classifier: Classifier,
    subjects: Mapping[str, SubjectFeatures],
    model_config: ModelConfig,
    classes: list[str],
    progress: ProgressFactory,
) -> tuple[SourceModel, Path]:
    """Stage 2, cached as a model bundle under the source model's folder, keyed by its config."""
    bundle_dir = source_dir / f"bundle-{config.pretrain.config_hash()}"
    strategy = config.pretrain.pairing
    if (bundle_dir / "manifest.json").is_file():
        bundle = load_bundle(bundle_dir)
        styles = SourceStyles.from_tensors(bundle.source_styles)
        return (
            SourceModel(
                classifier,
                bundle.translator,
                bundle.normalizer,
                styles,
                {k: np.asarray(v) for k, v in bundle.descriptors.items()},
                strategy,
            ),
            bundle_dir,
        )
    step = progress("stage 2: translator pre-training", config.pretrain.iterations)
    translator, normalizer, history = pretrain_translator(
        subjects, classifier, model_config, config.pretrain, progress=lambda i, n, _x: step(i, n)
    )
    styles = history["source_styles"]
    descriptors = _source_descriptors(subjects, strategy)
    save_bundle(
        bundle_dir,
        extractor=extractor,
        classifier=classifier,
        translator=translator,
        normalizer=normalizer,
        model_config=model_config,
        class_names=classes,
        source_styles=styles.as_tensors(),
        descriptors=descriptors,
        extra={
            "pairing": strategy,
            "pretrain": config.pretrain.model_dump(mode="json"),
            "domain": experiment_domain(config, classes, model_config).as_json(),
        },
    )
    return SourceModel(classifier, translator, normalizer, styles, descriptors, strategy), bundle_dir


@dataclass
class PreparedExperiment:
    """Everything before per-subject adaptation: cohort, frames, F and C, features, T0 (cached)."""

    config: ExperimentConfig
    index: DatasetIndex
    store: FrameStore
    classes: list[str]
    extractor: FeatureExtractor
    classifier: Classifier
    model: SourceModel
    bundle_dir: Path
    frames: dict[str, dict[str, FrameSet]]
    split_records: dict[str, dict[str, list[VideoRecord]]]
    sources: list[str]
    targets: list[str]
    timings: dict[str, float]
    cohort_dir: Path | None = None  # the synthetic cohort's folder (its manifest has the ground truth)
    pairing_fallback: str | None = None

    def target(self, subject: str) -> TargetData | None:
        """One target's data (None when it has no usable adapt or eval frames)."""
        return _target_data(subject, self.frames[subject])


def prepare_experiment(
    config: ExperimentConfig,
    cache_root: Path | None = None,
    progress: ProgressFactory = _silent,
    log: Callable[[str], None] = lambda _m: None,
) -> PreparedExperiment:
    """Cohort, face crops, stage 1, features and stage 2 for ``config`` - each made once, cached.

    ``config`` should be resolved (:meth:`ExperimentConfig.resolved`).
    """
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    timings: dict[str, float] = {}
    with _timed(timings, "cohort"):
        index = experiment_index(
            config.cohort, config.data, cache_root, progress("cohort: rendering videos", 1)
        )
        # the cohort's folder (made just above; its manifest has the ground truth), none for --data
        cohort_dir = ensure_cohort(config.cohort, cache_root) if config.data is None else None
    classes = list(index.classes)
    model_config = config.model.model_copy(update={"num_classes": len(classes)})
    model_config = ModelConfig.model_validate(model_config.model_dump())
    detector = config.data.detector if config.data is not None else None
    store = FrameStore(index, cache_root, config.video, config.crop, detector)
    with _timed(timings, "faces"):
        records = list(index.records)
        store.load_frames(records, progress("faces: decode + crop", len(records)))
    if store.rejected:
        log(f"{len(store.rejected)} video(s) rejected: " + "; ".join(r for _, r in store.rejected[:3]))

    with _timed(timings, "stage1"):
        extractor, classifier, source_dir = _load_or_train_source(
            config, store, index, model_config, cache_root, progress
        )
    f_hash = state_dict_sha256(extractor.state_dict())

    roles = index.roles
    by_subject = index.by_subject()
    with _timed(timings, "features"):
        step = progress("features: F on every frame", len(by_subject))
        frames: dict[str, dict[str, FrameSet]] = {}
        split_records: dict[str, dict[str, list[VideoRecord]]] = {}
        for done, (subject, recs) in enumerate(by_subject.items(), start=1):
            splits: dict[str, list[VideoRecord]] = split_records.setdefault(subject, {})
            for r in recs:
                splits.setdefault(r.split or "train", []).append(r)
            frames[subject] = {
                split: store.frame_set(rs, extractor, f_hash)
                for split, rs in splits.items()
                if any(r.path in store.videos for r in rs)
            }
            step(done, len(by_subject))
    sources = sorted(s for s in by_subject if roles.get(s) == "source" and "train" in frames[s])
    targets = sorted(s for s in by_subject if roles.get(s) == "target")
    source_feats = {s: _subject_features(frames[s]["train"]) for s in sources}
    fallback = None
    if config.pretrain.pairing == "landmark" and any(f.descriptor is None for f in source_feats.values()):
        fallback = (
            "landmark pairing needs facial landmarks of every source subject and the face detector "
            "gave none for some; cosine pairing was used"
        )
        log(fallback)
        cosine = config.pretrain.model_copy(update={"pairing": "cosine"})
        config = config.model_copy(update={"pretrain": cosine})

    with _timed(timings, "stage2"):
        model, bundle_dir = _load_or_pretrain_translator(
            config, source_dir, extractor, classifier, source_feats, model_config, classes, progress
        )
    return PreparedExperiment(
        config,
        index,
        store,
        classes,
        extractor,
        classifier,
        model,
        bundle_dir,
        frames,
        split_records,
        sources,
        targets,
        timings,
        cohort_dir,
        fallback,
    )


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    cache_root: Path | None = None,
    progress: ProgressFactory = _silent,
    log: Callable[[str], None] = lambda _m: None,
    *,
    ray_address: str | None = None,
) -> ExperimentResult:
    """Run ``pft simulate`` end to end and write its outputs to ``out_dir``.

    ``ray_address`` (``--ray-address``; batched engine only): the batched engine's chunks run as
    Ray tasks on that cluster (:mod:`pft.simulations.cluster`), with the same numbers. It is not
    part of the config: where a run ran does not change its results.
    """
    if ray_address is not None and config.engine != "batched":
        raise ValueError("ray_address runs the batched engine's chunks; use engine='batched'")
    config = config.resolved()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.write_json(out_dir / "config.json")
    prepared = prepare_experiment(config, cache_root, progress, log)
    timings = prepared.timings
    classes, store, extractor = prepared.classes, prepared.store, prepared.extractor
    model, bundle_dir, frames = prepared.model, prepared.bundle_dir, prepared.frames
    split_records, sources, targets = prepared.split_records, prepared.sources, prepared.targets

    per_method: dict[str, dict[str, dict[str, float]]] = {m: {} for m in config.methods}
    confusion: dict[str, dict[str, list[list[int]]]] = {m: {} for m in config.methods}  # rows true
    costs: dict[str, list[tuple[int, float]]] = {m: [] for m in config.methods}
    releases: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in config.methods}  # DP, if any
    embeddings: dict[str, np.ndarray] = {}
    with _timed(timings, "adaptation"):
        step = progress("stage 3: adapt + evaluate per target", len(targets) * len(config.methods))
        done = 0
        batched_pft: dict[str, MethodOutcome] = {}
        if config.engine == "batched" and "pft" in config.methods and config.settings.pft.dp is None:
            ready = [(k, t) for k, s in enumerate(targets) if (t := _target_data(s, frames[s])) is not None]
            on_cluster = progress("stage 3: batched chunks on the Ray cluster", 1) if ray_address else None

            def chunk_done(done: int, total: int, report: PieceReport) -> None:
                if on_cluster is not None:
                    on_cluster(done, total)
                log(f"chunk {report.index}: node {report.node}, {report.seconds:.2f} s ({done}/{total})")

            batched_pft = run_pft_batched(
                model,
                ready,
                config.settings,
                config.seed,
                config.batched,
                ray_address=ray_address,
                progress=chunk_done,
            )
        for k, subject in enumerate(targets):
            target = _target_data(subject, frames[subject])
            if target is None:
                log(f"{subject}: skipped (no usable adapt or eval frames)")
                continue
            if any(needs_images(m) for m in config.methods):  # methods that need pixels, not features
                own = split_records[subject]
                target.images = target_images(
                    store, extractor, own["adapt"], own["eval"], own.get("oracle", [])
                )
            for method in config.methods:
                outcome: MethodOutcome = (
                    batched_pft[subject]
                    if method == "pft" and subject in batched_pft
                    else METHODS[method](
                        model, method_input(method, target), config.settings, subject_seed(config.seed, k)
                    )
                )
                pred = outcome.logits.argmax(1).numpy()
                y = target.eval.labels.numpy()
                per_method[method][subject] = {
                    "f1": macro_f1(y, pred, len(classes)),
                    "accuracy": accuracy(y, pred),
                }
                confusion[method][subject] = confusion_matrix(y, pred, len(classes)).tolist()
                costs[method].append((outcome.iterations, outcome.seconds))
                if outcome.privacy is not None:
                    releases[method][subject] = outcome.privacy
                if method == "pft" and outcome.translated is not None and not embeddings:
                    embeddings = {
                        "target": target.eval.features.numpy(),
                        "translated": outcome.translated.numpy(),
                    }
                    embeddings["_subject"] = np.array([k])
                done += 1
                step(done, len(targets) * len(config.methods))

    results: dict[str, Any] = {
        "profile": config.profile,
        "seed": config.seed,
        "classes": classes,
        "config": config.model_dump(mode="json"),
        "machine": describe_machine(),
        "methods": {
            m: summarise_method(
                per_method[m],
                statistics.fmean(c[0] for c in costs[m]) if costs[m] else 0.0,
                statistics.fmean(c[1] for c in costs[m]) if costs[m] else 0.0,
            )
            for m in config.methods
            if per_method[m]
        },
        "subjects": {"source": len(sources), "target": len(targets)},
        # per method and subject (rows true class, columns predicted), and usable frames per split:
        # what pft.simulations.checks and the benchmark's per-class statistics read
        "confusion": {m: c for m, c in confusion.items() if c},
        "frames": {s: {k: len(v) for k, v in frames[s].items()} for s in targets},
        "rejected_videos": [{"path": str(p), "reason": r} for p, r in store.rejected],
        "timings_s": timings,
        "bundle": str(bundle_dir),
        "translator_params": sum(p.numel() for p in model.translator.parameters()),
        "extractor_params": sum(p.numel() for p in extractor.parameters()),
        "pairing": model.pairing,
        "pairing_fallback": prepared.pairing_fallback,
        "data": None
        if config.data is None
        else {"root": str(config.data.root), "layout": config.data.layout},
    }
    for m, rel in releases.items():  # DP: epsilon, delta, privacy unit, accountant per method
        if rel and m in results["methods"]:
            results["methods"][m]["privacy"] = summarise_releases(rel)
    write_results(out_dir, results)
    gaps = subject_gaps(results, load_manifest(prepared.cohort_dir)) if prepared.cohort_dir else []
    _write_report(out_dir, results, frames, sources, targets, embeddings, classes, config, gaps)
    return ExperimentResult(results, out_dir, timings)


def _target_data(subject: str, splits: Mapping[str, FrameSet]) -> TargetData | None:
    adapt, evaluation = splits.get("adapt"), splits.get("eval")
    if adapt is None or evaluation is None or len(adapt) == 0 or len(evaluation) == 0:
        return None
    return TargetData(subject, adapt, splits.get("oracle"), evaluation)


def _write_report(
    out_dir: Path,
    results: Mapping[str, Any],
    frames: Mapping[str, Mapping[str, FrameSet]],
    sources: list[str],
    targets: list[str],
    embeddings: Mapping[str, np.ndarray],
    classes: list[str],
    config: ExperimentConfig,
    gaps: Sequence[SubjectGap] = (),
) -> Path:
    bars = plot_per_subject(results, out_dir / "per_subject_f1.png")
    data = results.get("data")
    where = f"`{data['layout']}` dataset {data['root']}" if data else f"`{results['profile']}` cohort"
    dp = dp_description(results)
    lines = [
        f"# SFDA-PFT on the {where} (seed {results['seed']})" + (f" - {dp}" if dp else ""),
        "",
        *(
            [f"**Pairing fell back**: {results['pairing_fallback']}.", ""]
            if results.get("pairing_fallback")
            else []
        ),
        f"{results['subjects']['source']} source subjects, {results['subjects']['target']} target subjects; "
        "macro-F1 (%) per target subject on its held-out `eval` videos (frame level). "
        "PFT adapts only the translator T on the subject's NEUTRAL `adapt` videos; the oracle "
        "fine-tunes on the subject's labelled `oracle` videos (upper bound, never bold).",
        "",
        markdown_table(results),
        "",
        "| method | mean F1 | std F1 | adapt iterations | adapt seconds / subject |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["methods"].items():
        lines.append(
            f"| `{name}` | {entry['mean_f1']:.2f} | {entry['std_f1']:.2f} | "
            f"{entry['adapt_iterations']:.1f} | {entry['adapt_seconds']:.3f} |"
        )
    lines += ["", f"![per-subject F1]({bars.name})", "", *statistics_markdown(results), ""]
    if config.embedding_plot and embeddings and sources:
        k = int(embeddings["_subject"][0])
        subject = targets[k]
        rng = np.random.default_rng(config.seed)
        src = torch.cat([frames[s]["train"].features for s in sources])
        src_y = torch.cat([frames[s]["train"].labels for s in sources])
        pick = rng.choice(len(src), size=min(400, len(src)), replace=False)
        eval_y = frames[subject]["eval"].labels.numpy()
        png = plot_embedding(
            {
                "source": src[pick].numpy(),
                "target": embeddings["target"],
                "target translated": embeddings["translated"],
            },
            {"source": src_y[pick].numpy(), "target": eval_y, "target translated": eval_y},
            classes,
            out_dir / "features_embedding.png",
            f"{subject}: source vs target vs translated features",
            seed=config.seed,
        )
        lines += [
            f"Features of target `{subject}` before and after its personal translator, beside "
            "source features (colour = class):",
            "",
            f"![embedding]({png.name})",
            "",
        ]
    if gaps:
        png = plot_gaps(gaps, out_dir / "gap_analysis.png", "per-subject F1 against personal effects")
        lines += [
            "## Why subjects differ",
            "",
            markdown_correlations(gaps),
            "",
            f"![gap analysis]({png.name})",
            "",
        ]
    lines += [
        f"Timings (s): {json.dumps(results['timings_s'])}. T has {results['translator_params']:,} "
        f"parameters, F {results['extractor_params']:,}. Resolved config: `config.json`.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
