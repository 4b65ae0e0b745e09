"""``pft benchmark``'s outputs: ``benchmark.json``, ``report.md``, confusion and error-bar plots.

``report.md`` has, per seed role (test first; a role's seeds are never averaged with the other
role's) and per profile: the paper-style table (methods x subjects, seeds averaged), the summary
table (mean macro-F1 with its bootstrap CI, the paired statistics against source-only), per-class
F1 and a confusion-matrix plot per method; then one error-bar plot of the methods per role, every
warning, and the runs. docs/benchmark.md explains every column.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pft.core.atomic import atomic_write_text
from pft.core.results import markdown_table
from pft.simulations.analysis import (
    across_profiles,
    across_profiles_markdown,
    dp_description,
    findings_markdown,
    per_class_markdown,
    summary_markdown,
)


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def paper_table(group: Mapping[str, Any]) -> str:
    """The paper-style table of one analysis: methods x subjects, each cell the mean over seeds."""
    results = {
        "methods": {
            method: {
                "per_subject": {s: {"f1": v} for s, v in entry["per_subject"].items() if v is not None},
                "mean_f1": entry["mean_f1"],
            }
            for method, entry in group["methods"].items()
        }
    }
    return markdown_table(results)


def plot_confusions(group: Mapping[str, Any], out_png: Path) -> Path | None:
    """One panel per method: the eval confusion matrix pooled over subject-seeds, rows normalised
    (each row: how the frames of one true class were predicted, in percent). None without matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [
        (m, np.asarray(e["confusion"], float)) for m, e in group["methods"].items() if "confusion" in e
    ]
    if not methods:
        return None
    classes = list(group["classes"])
    k = len(classes)
    cols = min(4, len(methods))
    rows = int(np.ceil(len(methods) / cols))
    size = 1.0 + 0.45 * k
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 0.6, rows * size + 0.9), squeeze=False)
    for ax in axes.ravel()[len(methods) :]:
        ax.axis("off")
    for ax, (method, cm) in zip(axes.ravel(), methods, strict=False):
        share = 100.0 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=100, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 55 else "black",
                )
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    fig.suptitle(
        f"{group['profile']} ({group['role']} seeds {_seeds(group['seeds'])}): eval frames, % of each "
        "true class (rows) per predicted class (columns)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_errorbars(groups: Sequence[Mapping[str, Any]], out_png: Path) -> Path | None:
    """One panel per profile: each method's mean macro-F1 with its bootstrap CI as the error bar;
    source-only's mean dashed, the oracle's dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 + 2.6 * len(groups), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, group in zip(axes[0], groups, strict=True):
        names = list(group["methods"])
        colours = {
            g: cmap(i % 10)
            for i, g in enumerate(dict.fromkeys(e["group"] for e in group["methods"].values()))
        }
        for x, method in enumerate(names):
            entry = group["methods"][method]
            mean = entry["mean_f1"]
            low, high = entry["ci"]
            err = None if low is None or high is None else [[mean - low], [high - mean]]
            ax.errorbar(x, mean, yerr=err, fmt="o", capsize=3, color=colours[entry["group"]])
        for ref, style in ((group["baseline"], "--"), (group["upper_bound"], ":")):
            if ref and ref in group["methods"]:
                ax.axhline(group["methods"][ref]["mean_f1"], color="grey", linestyle=style, linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"{group['profile']} ({group['units']} subject-seeds)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("macro-F1 (%), 95% bootstrap CI")
    fig.suptitle(f"{groups[0]['role']} seeds {_seeds(groups[0]['seeds'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _dp_title(benchmark: Mapping[str, Any]) -> str | None:
    parts = {d for g in benchmark["groups"] if (d := dp_description(g))}
    return "; ".join(sorted(parts)) if parts else None


def report_markdown(benchmark: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The benchmark's report.md (``images``: plot key -> file name in the benchmark's folder)."""
    config = benchmark["config"]
    experiment = config["experiment"]
    groups = benchmark["groups"]
    dp = _dp_title(benchmark)
    title = f"# Benchmark: {', '.join(config['profiles'])} x seeds {_seeds(config['seeds'])}"
    lines = [title + (f" - {dp}" if dp else ""), ""]
    lines += [
        f"Methods: {', '.join(f'`{m}`' for m in experiment['methods'])}; engine `{experiment['engine']}`. "
        "Macro-F1 (%) per target subject on its held-out `eval` frames; the unit of every statistic is a "
        "subject-seed (one target person of one cohort seed). Resolved config: `benchmark-config.json`; "
        "each run's own outputs and config: `runs/<profile>-seed<seed>/`. How every column is computed: "
        "docs/benchmark.md.",
        "",
        "Seed protocol: **test** seeds (below 100) are the ones reported; **validation** seeds (100 and "
        "above) are the only ones on which defaults may be chosen. The two are never averaged together.",
        "",
    ]
    if dp:
        lines += [f"Privacy: {dp} (epsilon: the largest any subject spent).", ""]
    lines += ["## Warnings", "", *findings_markdown(benchmark["findings"], heading=None), ""]
    for role in ("test", "validation"):
        of_role = [g for g in groups if g["role"] == role]
        if not of_role:
            continue
        lines += [f"## {role.capitalize()} seeds {_seeds(of_role[0]['seeds'])}", ""]
        for group in of_role:
            key = f"{group['profile']}_{role}"
            lines += [
                f"### `{group['profile']}` ({role} seeds {_seeds(group['seeds'])}, "
                f"{group['units']} subject-seeds)",
                "",
                "Methods x subjects, each cell the mean over the seeds (each seed renders new people, so a "
                "column is a position in the cohort, not one person); best non-oracle value in bold:",
                "",
                paper_table(group),
                "",
                summary_markdown(group),
                "",
            ]
            dp_group = dp_description(group)
            if dp_group:
                lines += [f"Privacy: {dp_group}.", ""]
            per_class = per_class_markdown(group)
            if per_class:
                lines += ["Per-class F1 (mean over subject-seeds):", "", per_class, ""]
            if f"confusion_{key}" in images:
                lines += [f"![confusion matrices]({images[f'confusion_{key}']})", ""]
            if group["findings"]:
                lines += [f"{len(group['findings'])} warning(s) for this profile (see Warnings above).", ""]
        if f"errorbars_{role}" in images:
            lines += [f"![methods per profile]({images[f'errorbars_{role}']})", ""]
        summary = across_profiles(of_role)
        if summary is not None:
            lines += [f"### Across profiles ({role} seeds)", "", across_profiles_markdown(summary), ""]
    lines += ["## Runs", "", "| run | role | status | seconds |", "|---|---|---|---|"]
    for run in benchmark["runs"]:
        lines.append(f"| `{run['folder']}` | {run['role']} | {run['status']} | {run['seconds']:.1f} |")
    lines += ["", f"Computed now: {benchmark['seconds']:.1f} s (reused runs not counted).", ""]
    return "\n".join(lines)


def write_benchmark_outputs(out_dir: Path, benchmark: Mapping[str, Any]) -> Path:
    """Write benchmark.json (atomically), the plots and report.md into ``out_dir``; return report.md."""
    across = {
        role: summary
        for role in ("test", "validation")
        if (summary := across_profiles([g for g in benchmark["groups"] if g["role"] == role])) is not None
    }
    benchmark = {**benchmark, "across_profiles": across}
    atomic_write_text(out_dir / "benchmark.json", json.dumps(benchmark, indent=2) + "\n")
    images: dict[str, str] = {}
    for group in benchmark["groups"]:
        key = f"{group['profile']}_{group['role']}"
        png = plot_confusions(group, out_dir / f"confusion_{key}.png")
        if png is not None:
            images[f"confusion_{key}"] = png.name
    for role in ("test", "validation"):
        of_role = [g for g in benchmark["groups"] if g["role"] == role]
        png = plot_errorbars(of_role, out_dir / f"errorbars_{role}.png")
        if png is not None:
            images[f"errorbars_{role}"] = png.name
    return atomic_write_text(out_dir / "report.md", report_markdown(benchmark, images))
