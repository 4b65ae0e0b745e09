"""Efficiency of every method on a cohort, measured in ONE run (the paper's efficiency table).

For each method and target subject: macro-F1 and accuracy on the held-out ``eval`` frames,
iterations to convergence (the trainer's criterion, ``AdaptConfig``: EMA of the loss with
``beta = 0.8``, stop at step ``t >= min_iterations`` once ``|e_t - e_{t-10}| <= 1e-3 |e_{t-10}|``,
else at ``max_iterations``; whether it converged is reported), wall time of the whole runner call
(adaptation + prediction on the eval frames), the trainable parameter count, and memory: the peak
resident-set growth during the call (RSS sampled every 2 ms from ``/proc/self/statm``; memory the
process already holds and reuses is not counted) and the peak Python-heap allocation (tracemalloc;
torch's tensor storage is not in it).

The cohort, crops, features, F, C and T0 come from ``run_experiment`` (cached, so a second bench is
fast); methods then run here one subject at a time with the same seeds as the experiment
(``pft.core.seeding.subject_seed(seed, k)`` for the k-th target), with the face crops attached for
the methods that re-run F (AdaBN, the oracle, the image-space SFDA-IT, SFIT and DSFDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pft.core.bundle import load_bundle
from pft.core.data.cache import state_dict_sha256
from pft.core.frames import FrameStore
from pft.core.machine import describe_machine
from pft.core.methods import METHODS, MethodOutcome, TargetData, method_spec, target_images
from pft.core.metrics import accuracy, macro_f1
from pft.core.pairing import Strategy
from pft.core.personalize import SourceModel
from pft.core.seeding import subject_seed
from pft.core.training import SourceStyles
from pft.simulations.experiment import ExperimentConfig, run_experiment
from pft.simulations.workspace import default_cache_root, ensure_cohort, open_cohort

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: no sampling, growth reads 0
        return 0


@dataclass
class MemoryPeak:
    """Peak RSS growth and peak Python-heap allocation (bytes) over a ``measure_memory`` block."""

    rss_growth: int = 0
    python_heap: int = 0


@contextmanager
def measure_memory(interval_s: float = 0.002) -> Iterator[MemoryPeak]:
    """Sample RSS in a thread and trace Python allocations while the block runs."""
    peak = MemoryPeak()
    base = _rss_bytes()
    highest = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            highest[0] = max(highest[0], _rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        highest[0] = max(highest[0], _rss_bytes())
        peak.python_heap = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peak.rss_growth = highest[0] - base


def _source_model(bundle_dir: Path, pairing: Strategy) -> tuple[SourceModel, Any]:
    bundle = load_bundle(bundle_dir)
    styles = SourceStyles.from_tensors(bundle.source_styles)
    descriptors = {k: np.asarray(v) for k, v in bundle.descriptors.items()}
    model = SourceModel(bundle.classifier, bundle.translator, bundle.normalizer, styles, descriptors, pairing)
    return model, bundle


def _targets(config: ExperimentConfig, cache_root: Path, bundle: Any) -> list[tuple[int, TargetData]]:
    """Every target subject's adapt/oracle/eval frames (cached features) with crops attached."""
    index = open_cohort(ensure_cohort(config.cohort, cache_root))
    store = FrameStore(index, cache_root, config.video, config.crop)
    extractor = bundle.extractor
    f_hash = state_dict_sha256(extractor.state_dict())
    roles, by_subject = index.roles, index.by_subject()
    targets = sorted(s for s in by_subject if roles.get(s) == "target")
    store.load_frames([r for s in targets for r in by_subject[s]])
    out: list[tuple[int, TargetData]] = []
    for k, subject in enumerate(targets):
        splits: dict[str, list[Any]] = {}
        for r in by_subject[subject]:
            if r.path in store.videos:
                splits.setdefault(r.split or "train", []).append(r)
        if "adapt" not in splits or "eval" not in splits:
            continue
        sets = {name: store.frame_set(rs, extractor, f_hash) for name, rs in splits.items()}
        images = target_images(store, extractor, splits["adapt"], splits["eval"], splits.get("oracle", []))
        out.append((k, TargetData(subject, sets["adapt"], sets.get("oracle"), sets["eval"], images)))
    return out


def bench_methods(
    config: ExperimentConfig,
    out_dir: Path,
    cache_root: Path | None = None,
    methods: tuple[str, ...] | None = None,
    log: Callable[[str], None] = lambda _m: None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Measure ``methods`` (default: every registered one) on the cohort of ``config``.

    Writes ``bench_methods.json`` and ``bench_methods.md`` to ``out_dir`` and returns the dict:
    per method the mean over subjects of each measure and the per-subject rows. With ``warmup``,
    every method first runs once, unmeasured, on the first subject, so that one-time costs do not
    land on whichever method happens to run first.
    """
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    names = tuple(methods or METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    t0 = time.perf_counter()
    prepared = run_experiment(
        config.model_copy(update={"methods": ("source_only",), "embedding_plot": False}),
        out_dir / "prepare",
        cache_root,
    )
    resolved = config.resolved()
    model, bundle = _source_model(Path(prepared.results["bundle"]), resolved.pretrain.pairing)
    targets = _targets(resolved, cache_root, bundle)
    log(f"prepared {len(targets)} target subjects in {time.perf_counter() - t0:.1f} s")
    classes = prepared.results["classes"]
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    if warmup and targets:  # one unmeasured call per method: one-time costs (lazy imports, allocator)
        k0, first = targets[0]
        for method in names:
            if method_spec(method).source_free or (first.oracle is not None and len(first.oracle) > 0):
                METHODS[method](model, first, resolved.settings, subject_seed(resolved.seed, k0))
    for method in names:
        for k, target in targets:
            if not method_spec(method).source_free and (target.oracle is None or len(target.oracle) == 0):
                continue
            with measure_memory() as memory:
                start = time.perf_counter()
                outcome: MethodOutcome = METHODS[method](
                    model, target, resolved.settings, subject_seed(resolved.seed, k)
                )
                wall = time.perf_counter() - start
            y, pred = target.eval.labels.numpy(), outcome.logits.argmax(1).numpy()
            rows[method].append(
                {
                    "subject": target.subject,
                    "f1": macro_f1(y, pred, len(classes)),
                    "accuracy": accuracy(y, pred),
                    "iterations": outcome.iterations,
                    "converged": outcome.converged,
                    "adapt_seconds": outcome.seconds,
                    "wall_seconds": wall,
                    "trainable_parameters": outcome.trainable_parameters,
                    "peak_rss_growth_mb": memory.rss_growth / 2**20,
                    "peak_python_heap_mb": memory.python_heap / 2**20,
                }
            )
        log(f"{method}: done")
    summary = {m: _summarise(r) for m, r in rows.items() if r}
    result = {
        "profile": resolved.profile,
        "seed": resolved.seed,
        "subjects": {"source": prepared.results["subjects"]["source"], "target": len(targets)},
        "machine": describe_machine(),
        "methods": summary,
        "per_subject": rows,
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_methods.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "bench_methods.md").write_text(markdown(result))
    return result


def _summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    def mean(key: str) -> float:
        return statistics.fmean(float(r[key]) for r in rows)

    converged = [r["converged"] for r in rows if r["converged"] is not None]
    return {
        "mean_f1": mean("f1"),
        "mean_accuracy": mean("accuracy"),
        "iterations": mean("iterations"),
        "converged_fraction": statistics.fmean(map(float, converged)) if converged else float("nan"),
        "wall_seconds_per_subject": mean("wall_seconds"),
        "adapt_seconds_per_subject": mean("adapt_seconds"),
        "trainable_parameters": mean("trainable_parameters"),
        "peak_rss_growth_mb": max(float(r["peak_rss_growth_mb"]) for r in rows),
        "peak_python_heap_mb": max(float(r["peak_python_heap_mb"]) for r in rows),
    }


def markdown(result: dict[str, Any]) -> str:
    """The efficiency table of a ``bench_methods`` result, with the machine it ran on."""
    m = result["machine"]
    lines = [
        f"# Methods on `{result['profile']}` (seed {result['seed']}): {result['subjects']['source']} "
        f"source, {result['subjects']['target']} target subjects",
        "",
        "| method | macro-F1 | accuracy | iterations | converged | wall s / subject | trainable params "
        "| peak RSS growth MB | peak Python heap MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["methods"].items():
        lines.append(
            f"| `{name}` | {s['mean_f1']:.2f} | {s['mean_accuracy']:.2f} | {s['iterations']:.1f} | "
            f"{s['converged_fraction']:.2f} | {s['wall_seconds_per_subject']:.3f} | "
            f"{s['trainable_parameters']:,.0f} | {s['peak_rss_growth_mb']:.1f} | "
            f"{s['peak_python_heap_mb']:.2f} |"
        )
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; total {result['seconds_total']} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m pft.simulations.bench_methods --source-subjects 20 --target-subjects 3``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", default="biovid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-subjects", type=int, default=None)
    parser.add_argument("--target-subjects", type=int, default=None)
    parser.add_argument("--methods", default="all", help="comma-separated methods or 'all'")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = ExperimentConfig(
        profile=args.profile,
        seed=args.seed,
        source_subjects=args.source_subjects,
        target_subjects=args.target_subjects,
    )
    methods = (
        None if args.methods == "all" else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    )
    result = bench_methods(config, args.out, args.cache_dir, methods, log=print)
    print(markdown(result))


if __name__ == "__main__":
    main()
