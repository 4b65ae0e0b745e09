"""Why target subjects differ: per-subject F1 against the generator's ground truth about them.

On the synthetic cohort the generator knows each subject's personal effects - how far their
resting face leans towards an expressive class, how expressive they are, whether they wear
glasses, their capture conditions. Setting the source model's and the oracle's per-subject F1
against these shows whether the personalisation gap comes from those effects (as it should) and
not from something else (a broken split, a degenerate class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from pft.core.cohort.manifest import CohortManifest

#: The generator's per-subject ground truth compared with the gap, and how to read each.
FACTORS: dict[str, str] = {
    "resting_lean": "strength of the resting face's lean towards an expressive class (0 = none)",
    "expressiveness": "how strongly the subject expresses (x apex intensity)",
    "glasses": "1 if the subject wears glasses (tint and glare over the eyes)",
    "wrinkles": "age cue strength",
    "capture_noise": "sensor noise sigma of the subject's capture (grey levels)",
    "capture_blur": "blur sigma of the subject's capture (pixels)",
    "capture_contrast": "contrast of the subject's capture",
}


@dataclass(frozen=True)
class SubjectGap:
    """One target subject (of one cohort seed): its personal effects and two methods' F1."""

    subject: str
    seed: int
    factors: dict[str, float]
    source_f1: float
    oracle_f1: float

    @property
    def gap(self) -> float:
        """Oracle minus source-only macro-F1 (points)."""
        return self.oracle_f1 - self.source_f1


def subject_factors(manifest: CohortManifest) -> dict[str, dict[str, float]]:
    """Per subject id, the values of :data:`FACTORS` from the cohort manifest."""
    out: dict[str, dict[str, float]] = {}
    for s in manifest.subjects:
        traits = s.traits
        out[s.id] = {
            "resting_lean": float(s.resting_offset_strength if s.resting_leans else 0.0),
            "expressiveness": float(s.expressiveness),
            "glasses": float(bool(traits.get("glasses", False))),
            "wrinkles": float(traits.get("wrinkles", math.nan)),
            "capture_noise": float(traits.get("capture_noise", math.nan)),
            "capture_blur": float(traits.get("capture_blur", math.nan)),
            "capture_contrast": float(traits.get("capture_contrast", math.nan)),
        }
    return out


def subject_gaps(
    results: Mapping[str, Any], manifest: CohortManifest, source: str = "source_only", oracle: str = "oracle"
) -> list[SubjectGap]:
    """The per-subject rows of one run's results.json (needs both methods)."""
    methods = results["methods"]
    if source not in methods or oracle not in methods:
        return []
    factors = subject_factors(manifest)
    rows = []
    for subject, entry in methods[source]["per_subject"].items():
        if subject in methods[oracle]["per_subject"] and subject in factors:
            rows.append(
                SubjectGap(
                    subject,
                    int(results["seed"]),
                    factors[subject],
                    float(entry["f1"]),
                    float(methods[oracle]["per_subject"][subject]["f1"]),
                )
            )
    return rows


def correlations(rows: Sequence[SubjectGap]) -> dict[str, dict[str, float]]:
    """Spearman's rho (and its p-value) of each factor with source-only F1 and with the gap.

    A factor that is constant over the rows (or undefined) gets NaN.
    """
    out: dict[str, dict[str, float]] = {}
    for name in FACTORS:
        x = np.array([r.factors.get(name, math.nan) for r in rows], dtype=float)
        entry: dict[str, float] = {}
        for label, y in (("source_f1", [r.source_f1 for r in rows]), ("gap", [r.gap for r in rows])):
            ok = ~np.isnan(x)
            if ok.sum() < 3 or np.ptp(x[ok]) == 0:
                entry[f"rho_{label}"], entry[f"p_{label}"] = math.nan, math.nan
                continue
            res = spearmanr(x[ok], np.asarray(y, dtype=float)[ok])
            entry[f"rho_{label}"], entry[f"p_{label}"] = float(res.statistic), float(res.pvalue)
        out[name] = entry
    return out


def markdown_correlations(rows: Sequence[SubjectGap]) -> str:
    """A table: factor, Spearman rho with source-only F1 and with the gap (p-values), meaning."""
    corr = correlations(rows)
    lines = [
        f"Per-subject personal effects against F1 ({len(rows)} subject-seeds; Spearman's rho, p):",
        "",
        "| factor | rho with source-only F1 | rho with oracle - source gap | what it is |",
        "|---|---|---|---|",
    ]

    def cell(rho: float, p: float) -> str:
        return "-" if math.isnan(rho) else f"{rho:+.2f} (p={p:.3f})"

    for name, meaning in FACTORS.items():
        c = corr[name]
        lines.append(
            f"| `{name}` | {cell(c['rho_source_f1'], c['p_source_f1'])} | {cell(c['rho_gap'], c['p_gap'])} "
            f"| {meaning} |"
        )
    return "\n".join(lines)


def plot_gaps(rows: Sequence[SubjectGap], out_png: Path, title: str) -> Path:
    """Scatter plots of source-only and oracle F1 against the resting lean and expressiveness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, name in zip(axes, ("resting_lean", "expressiveness"), strict=True):
        x = [r.factors[name] for r in rows]
        ax.scatter(x, [r.source_f1 for r in rows], label="source-only", marker="o", alpha=0.8)
        ax.scatter(x, [r.oracle_f1 for r in rows], label="oracle", marker="^", alpha=0.8)
        for r, xv in zip(rows, x, strict=True):
            ax.plot([xv, xv], [r.source_f1, r.oracle_f1], color="grey", lw=0.6, alpha=0.5)
        ax.set_xlabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("macro-F1 (%) per target subject")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
