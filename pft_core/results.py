"""Results of a run: the results.json schema, the paper-style table and the per-subject plot.

One format for both producers of results: ``pft simulate`` (any engine, :mod:`pft.simulations`) and
the Flower ServerApp of a deployment (:mod:`pft.server.app`). The plot needs matplotlib (the
``server`` or ``sim`` extra); it is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pft.core.atomic import atomic_write_text

#: Row groups in the order of the paper's tables; methods not listed go under "Other".
METHOD_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Source-only", ("source_only",)),
    ("Simple baselines", ("neutral_calibration", "neutral_norm", "neutral_norm_matched", "adabn")),
    ("SFDA (model-based)", ("shot", "nrc", "tpds")),
    # the paper's data-based SFDA methods: image-space generators (pft.core.image_translation)
    ("SFDA (data-based)", ("dsfda", "sfit", "sfda_it")),
    ("SFDA-PFT (ours)", ("pft",)),
    ("Oracle", ("oracle", "oracle_bias")),
)
#: methods that see the target's labels (upper bounds, never bold): the oracle, and the reach of
#: bias-only stage 3 (``oracle_bias``, T's output bias fitted with the labels)
UPPER_BOUNDS = frozenset({"oracle", "oracle_bias"})
#: registered methods (``pft.core.methods.register_method``): name -> its row group
_REGISTERED_GROUPS: dict[str, str] = {}
_REGISTERED_UPPER_BOUNDS: set[str] = set()


def register_row(name: str, group: str = "Other", upper_bound: bool = False) -> None:
    """List a registered method in ``group`` of the table (after the group's built-in rows; a new
    group name comes before the oracle's); an ``upper_bound`` is never bold, like the oracle."""
    _REGISTERED_GROUPS[name] = group
    if upper_bound:
        _REGISTERED_UPPER_BOUNDS.add(name)
    else:
        _REGISTERED_UPPER_BOUNDS.discard(name)


def is_upper_bound(name: str) -> bool:
    """Whether method ``name`` is an upper bound (labelled target data: never bold)."""
    return name in UPPER_BOUNDS or name in _REGISTERED_UPPER_BOUNDS


def summarise_method(
    per_subject: Mapping[str, Mapping[str, float]],
    adapt_iterations: float,
    adapt_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One method's entry of results.json: per-subject scores, mean/std F1, adaptation cost.

    ``std_f1`` is the population standard deviation over subjects (0 for one subject).
    """
    f1s = [float(v["f1"]) for v in per_subject.values()]
    entry: dict[str, Any] = {
        "per_subject": {k: {m: round(float(x), 4) for m, x in v.items()} for k, v in per_subject.items()},
        "mean_f1": round(statistics.fmean(f1s), 4) if f1s else float("nan"),
        "std_f1": round(statistics.pstdev(f1s), 4) if len(f1s) > 1 else 0.0,
        "adapt_iterations": round(float(adapt_iterations), 2),
        "adapt_seconds": round(float(adapt_seconds), 4),
    }
    if extra:
        entry.update(extra)
    return entry


def ordered_methods(names: Sequence[str]) -> list[tuple[str, str]]:
    """(group, method) pairs in the paper's row order."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    known = [g for g, _ in METHOD_GROUPS]
    new_groups = list(
        dict.fromkeys(g for g in _REGISTERED_GROUPS.values() if g not in known and g != "Other")
    )
    groups = [*METHOD_GROUPS[:-1], *((g, ()) for g in new_groups), METHOD_GROUPS[-1]]  # Oracle last
    for group, members in groups:
        added = tuple(n for n in names if _REGISTERED_GROUPS.get(n) == group and n not in members)
        for name in (*members, *added):
            if name in names and name not in seen:
                rows.append((group, name))
                seen.add(name)
    rows.extend(("Other", n) for n in names if n not in seen)
    return rows


def markdown_table(results: Mapping[str, Any], digits: int = 2) -> str:
    """The paper-style table: rows = methods (grouped), columns = subjects + average.

    The best value per column among the non-oracle methods is in bold, as in the paper.
    """
    methods: Mapping[str, Any] = results["methods"]
    subjects = sorted({s for m in methods.values() for s in m["per_subject"]})
    rows = ordered_methods(list(methods))
    columns = [*subjects, "Average"]

    def cell(method: str, column: str) -> float:
        entry = methods[method]
        if column == "Average":
            return float(entry["mean_f1"])
        score = entry["per_subject"].get(column)
        return float(score["f1"]) if score else float("nan")

    best: dict[str, float] = {}
    for column in columns:
        values = [cell(m, column) for _, m in rows if not is_upper_bound(m)]
        values = [v for v in values if not np.isnan(v)]
        best[column] = max(values) if values else float("nan")

    lines = [
        "| Setting | Method | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    previous_group = None
    for group, method in rows:
        shown_group = group if group != previous_group else ""
        previous_group = group
        cells = []
        for column in columns:
            value = cell(method, column)
            text = "-" if np.isnan(value) else f"{value:.{digits}f}"
            if not is_upper_bound(method) and not np.isnan(value) and value == best[column]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {shown_group} | `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, results: Mapping[str, Any]) -> Path:
    """Write results.json atomically."""
    return atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")


def plot_per_subject(results: Mapping[str, Any], out_png: Path) -> Path:
    """Grouped bars: macro-F1 per target subject for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for _, m in ordered_methods(list(results["methods"]))]
    subjects = sorted({s for m in results["methods"].values() for s in m["per_subject"]})
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(subjects) + 2), 3.6))
    x = np.arange(len(subjects))
    for k, method in enumerate(methods):
        per = results["methods"][method]["per_subject"]
        ax.bar(x + k * width, [per.get(s, {}).get("f1", 0.0) for s in subjects], width, label=method)
    ax.set_xticks(x + 0.4 - width / 2, subjects, rotation=45, ha="right")
    ax.set_ylabel("macro-F1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['profile']} - per-subject macro-F1 (seed {results['seed']})")
    ax.legend(ncol=min(len(methods), 4), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
