"""Single-subject numbers: adaptation latency (translator only, cached features) and F's
feature-extraction throughput on CPU (``pft bench adapt``, ``pft bench features``)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from pft.core.machine import describe_machine
from pft.core.models import FeatureExtractor, ModelConfig
from pft.core.personalize import PersonalizeConfig, personalize
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject


def bench_adapt(repeats: int = 7, frames: int = 96, bias_only: bool = True, seed: int = 0) -> dict[str, Any]:
    """Median wall time of ``personalize`` (stage 3 with the default ``PersonalizeConfig``: early
    stopping on) for one synthetic subject's cached neutral features, over ``repeats`` runs with
    seeds ``seed..seed+repeats-1`` (one warm-up run first)."""
    model = synthetic_model(seed)
    subject = synthetic_subject(0, seed, frames=frames)
    config = PersonalizeConfig(bias_only=bias_only)
    times, steps = [], []
    for k in range(-1, repeats):
        t0 = time.perf_counter()
        out = personalize(
            model,
            subject.features,
            subject.frame_stats,
            config.model_copy(update={"seed": seed + max(k, 0)}),
            video_ids=subject.video_ids,
            time_index=subject.time_index,
        )
        if k >= 0:
            times.append(time.perf_counter() - t0)
            steps.append(out.result.iterations)
    return {
        "median_ms": round(1000 * statistics.median(times), 2),
        "min_ms": round(1000 * min(times), 2),
        "runs_ms": [round(1000 * t, 2) for t in times],
        "iterations": steps,
        "frames": frames,
        "bias_only": bias_only,
        "translator_params": model.translator.param_count(),
        "machine": describe_machine(),
    }


def bench_features(
    frames: int = 512, batch_size: int = 128, repeats: int = 3, threads: int | None = None
) -> dict[str, Any]:
    """Frames per second through F (pooled features + tapped statistics, one pass per frame) on
    CPU, for the default ``ModelConfig`` at batch ``batch_size``; the median of ``repeats``."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        config = ModelConfig()
        extractor = FeatureExtractor(config).eval()
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(frames, 3, config.image_size, config.image_size, generator=gen) * 2 - 1
        rates = []
        with torch.no_grad():
            extractor.features_and_statistics(images[:batch_size])
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(0, frames, batch_size):
                    extractor.features_and_statistics(images[i : i + batch_size])
                rates.append(frames / (time.perf_counter() - t0))
        return {
            "frames_per_s": round(statistics.median(rates), 1),
            "frames": frames,
            "batch_size": batch_size,
            "image_size": config.image_size,
            "width": config.width,
            "threads": torch.get_num_threads(),
            "machine": describe_machine(),
        }
    finally:
        torch.set_num_threads(before)
