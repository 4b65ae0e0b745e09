"""The work every engine of ``pft bench engines`` does: the same subjects, the same fixed steps.

Subject k of the benchmark's synthetic cohort (:mod:`pft.simulations.synthetic_world`) is built
from the seed wherever it is adapted (in the loop, in a batched chunk, in a Flower virtual node),
and stage 3 runs a fixed number of steps (no early stop), so every engine does the same work.
Shared by :mod:`pft.simulations.bench_engines` and its Flower apps
(:mod:`pft.simulations.bench_flower_apps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pft.core.adaptation import AdaptConfig, ModelParts, adapt_translator
from pft.core.personalize import PersonalizeConfig
from pft.core.seeding import subject_seed
from pft.simulations.batched import SubjectTask, subject_task
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject

__all__ = ["adapt_one", "iter_tasks", "make_tasks", "work_config"]


def work_config(iterations: int = 50, batch_size: int = 64, bias_only: bool = False) -> PersonalizeConfig:
    """Stage 3 with a fixed number of steps (no early stop), so every engine does the same work."""
    adapt = AdaptConfig(lr=0.01, max_iterations=iterations, min_iterations=iterations, batch_size=batch_size)
    return PersonalizeConfig(adapt=adapt, bias_only=bias_only)


def iter_tasks(spec: dict[str, Any], indices: Iterable[int]) -> Iterator[SubjectTask]:
    """The subjects ``indices`` of the benchmark's synthetic cohort, built one at a time."""
    model = synthetic_model(spec["seed"])
    config = work_config(spec["iterations"], spec["batch_size"], spec["bias_only"])
    for k in indices:
        s = synthetic_subject(k, spec["seed"], frames=spec["frames"])
        yield subject_task(
            model,
            s.features,
            s.frame_stats,
            config,
            subject_seed(spec["seed"], k),
            subject=s.name,
            video_ids=s.video_ids,
            time_index=s.time_index,
        )


def make_tasks(spec: dict[str, Any], indices: Iterable[int]) -> list[SubjectTask]:
    """The subjects ``indices`` of the benchmark's synthetic cohort, ready to adapt."""
    return list(iter_tasks(spec, indices))


def adapt_one(spec: dict[str, Any], task: SubjectTask, model_parts: ModelParts) -> int:
    """The per-client engine's work for one subject (the trainer via ``adapt_translator``)."""
    config = work_config(spec["iterations"], spec["batch_size"], spec["bias_only"])
    parts = ModelParts(
        classifier=model_parts.classifier,
        translator=model_parts.translator,
        style_target=task.style_target,
        style_reference=task.style_reference,
        targets=task.targets,
    )
    _, result = adapt_translator(
        parts,
        task.features,
        config.adapt.model_copy(update={"seed": task.seed}),
        config.method(),
        video_ids=task.video_ids,
        time_index=task.time_index,
    )
    return result.iterations
