"""Runs of one profile and seed role, analysed together: means, CIs, paired tests, per-class F1.

``analyse_runs(results_list)`` takes the ``results.json`` dicts of one profile's runs whose seeds
share a role (all test or all validation seeds; mixing them is refused) and returns a JSON-ready
dict that ``pft benchmark`` writes into ``benchmark.json``; ``pft simulate`` calls it with its one
run. The statistics are those of :mod:`pft.simulations.stats` over subject-seeds; the warnings
those of :mod:`pft.simulations.checks`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from pft.core.config import FrozenConfig
from pft.core.results import ordered_methods
from pft.simulations.checks import CheckConfig, Finding, check_run, run_confusions
from pft.simulations.protocol import seed_role
from pft.simulations.stats import (
    BOOTSTRAP_RESAMPLES,
    MIN_GAP,
    TIE_TOLERANCE,
    bootstrap_mean_ci,
    gap_share,
    nanmean_columns,
    paired_wilcoxon,
    per_class_f1,
    win_tie_loss,
)

Unit = tuple[int, str]
"""A subject-seed: (cohort seed, target subject)."""


class StatsConfig(FrozenConfig):
    """How runs are compared: the baseline of the paired statistics, the bootstrap, the checks."""

    baseline: str = "source_only"
    upper_bound: str = "oracle"
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    resamples: int = Field(BOOTSTRAP_RESAMPLES, ge=100)
    bootstrap_seed: int = Field(0, ge=0)
    tie_tolerance: float = Field(TIE_TOLERANCE, ge=0.0)
    min_gap: float = Field(MIN_GAP, ge=0.0)
    checks: CheckConfig = CheckConfig()


def _round(value: float, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _scores(runs: Sequence[Mapping[str, Any]], method: str) -> dict[Unit, float]:
    out: dict[Unit, float] = {}
    for results in runs:
        entry = results["methods"].get(method)
        if entry is None:
            continue
        for subject, score in entry["per_subject"].items():
            out[(int(results["seed"]), subject)] = float(score["f1"])
    return out


def _privacy(runs: Sequence[Mapping[str, Any]], method: str) -> dict[str, Any] | None:
    found = [r["methods"][method]["privacy"] for r in runs if r["methods"].get(method, {}).get("privacy")]
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        for key in ("privacy_unit", "accountant", "delta"):
            if other[key] != first[key]:
                raise ValueError(f"{method}: runs with different DP {key} cannot be analysed together")
    return {
        "epsilon": max(float(p["epsilon"]) for p in found),
        "delta": first["delta"],
        "privacy_unit": first["privacy_unit"],
        "accountant": first["accountant"],
        "runs": len(found),
    }


def analyse_runs(runs: Sequence[Mapping[str, Any]], config: StatsConfig | None = None) -> dict[str, Any]:
    """The statistics of one profile's runs over subject-seeds (see the module docstring).

    Parameters
    ----------
    runs:
        ``results.json`` dicts of one profile, one per seed, all seeds of one role.
    config:
        Baseline, bootstrap and check settings (default :class:`StatsConfig`).

    Returns
    -------
    dict
        ``profile``, ``role``, ``seeds``, ``classes``, ``units``, ``baseline``, ``upper_bound``,
        ``methods`` (per method, in the paper's row order: ``group``, ``mean_f1``, ``ci``,
        ``per_seed``, ``per_subject`` (seeds averaged), ``units`` and, against the baseline,
        ``delta``, ``delta_ci``, ``gap_share``, ``wilcoxon``, ``wins``/``ties``/``losses``; with
        confusion matrices ``per_class_f1`` and the pooled ``confusion``; ``privacy`` for a DP
        method), ``findings`` (the checks' warnings) and ``settings``.
    """
    config = config or StatsConfig()
    if not runs:
        raise ValueError("analyse_runs needs at least one run")
    profiles = {r["profile"] for r in runs}
    if len(profiles) != 1:
        raise ValueError(f"runs of one profile only, got {sorted(profiles)}")
    seeds = sorted(int(r["seed"]) for r in runs)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"one run per seed, got seeds {seeds}")
    roles = {seed_role(s) for s in seeds}
    if len(roles) != 1:
        raise ValueError(f"validation and test seeds are never analysed together (seeds {seeds})")
    classes = list(runs[0]["classes"])
    if any(list(r["classes"]) != classes for r in runs):
        raise ValueError("runs with different classes cannot be analysed together")

    names: list[str] = []
    for results in runs:
        names.extend(m for m in results["methods"] if m not in names)
    scores = {m: _scores(runs, m) for m in names}
    baseline = scores.get(config.baseline, {})
    upper = scores.get(config.upper_bound, {})
    by_seed = {int(r["seed"]): r for r in runs}

    methods: dict[str, Any] = {}
    for group, method in ordered_methods(names):
        own = scores[method]
        units = sorted(own)
        values = np.array([own[u] for u in units])
        low, high = bootstrap_mean_ci(values, config.confidence, config.resamples, config.bootstrap_seed)
        subjects = sorted({s for _, s in units})
        entry: dict[str, Any] = {
            "group": group,
            "units": len(units),
            "mean_f1": _round(float(values.mean())),
            "std_f1": _round(float(values.std())),
            "ci": [_round(low), _round(high)],
            "per_seed": {
                str(seed): _round(statistics.fmean(own[u] for u in units if u[0] == seed))
                for seed in seeds
                if any(u[0] == seed for u in units)
            },
            "per_subject": {
                s: _round(statistics.fmean(own[u] for u in units if u[1] == s)) for s in subjects
            },
            "adapt_iterations": _round(
                statistics.fmean(
                    float(by_seed[seed]["methods"][method]["adapt_iterations"])
                    for seed in seeds
                    if method in by_seed[seed]["methods"]
                ),
                2,
            ),
        }
        if baseline and method != config.baseline:
            common = sorted(set(own) & set(baseline))
            x = np.array([own[u] for u in common])
            y = np.array([baseline[u] for u in common])
            d = x - y
            d_low, d_high = bootstrap_mean_ci(d, config.confidence, config.resamples, config.bootstrap_seed)
            wins, ties, losses = win_tie_loss(x, y, config.tie_tolerance)
            entry.update(
                delta=_round(float(d.mean())) if len(d) else None,
                delta_ci=[_round(d_low), _round(d_high)],
                wilcoxon=paired_wilcoxon(x, y, config.tie_tolerance).as_dict() if len(d) else None,
                wins=wins,
                ties=ties,
                losses=losses,
            )
        if baseline and upper:
            common = sorted(set(own) & set(baseline) & set(upper))
            if common:
                entry["gap"] = _round(
                    statistics.fmean(upper[u] for u in common) - statistics.fmean(baseline[u] for u in common)
                )
                entry["gap_share"] = _round(
                    gap_share(
                        statistics.fmean(own[u] for u in common),
                        statistics.fmean(baseline[u] for u in common),
                        statistics.fmean(upper[u] for u in common),
                        config.min_gap,
                    )
                )
        confusions = {(int(r["seed"]), s): cm for r in runs for s, cm in run_confusions(r, method).items()}
        if confusions:
            rows = [per_class_f1(confusions[u]) for u in sorted(confusions)]
            entry["per_class_f1"] = {
                c: _round(float(v)) for c, v in zip(classes, nanmean_columns(rows), strict=True)
            }
            entry["confusion"] = np.sum([confusions[u] for u in sorted(confusions)], axis=0).tolist()
        privacy = _privacy(runs, method)
        if privacy is not None:
            entry["privacy"] = privacy
        methods[method] = entry

    findings = [f for r in sorted(runs, key=lambda r: int(r["seed"])) for f in check_run(r, config.checks)]
    return {
        "profile": runs[0]["profile"],
        "role": roles.pop(),
        "seeds": seeds,
        "classes": classes,
        "units": len({u for own in scores.values() for u in own}),
        "baseline": config.baseline if baseline else None,
        "upper_bound": config.upper_bound if upper else None,
        "methods": methods,
        "findings": [f.as_dict() for f in findings],
        "settings": config.model_dump(mode="json"),
    }


# --- text -----------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(interval: Sequence[float | None]) -> str:
    low, high = interval
    return "-" if low is None or high is None else f"[{low:.2f}, {high:.2f}]"


def _p(test: Mapping[str, Any] | None) -> str:
    if not test:
        return "-"
    p = float(test["p_value"])
    text = f"{p:.2g}" if p < 0.001 else f"{p:.3f}"
    return f"{text} (n={test['n_nonzero']})"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.0f}%"


def dp_description(analysis_or_results: Mapping[str, Any]) -> str | None:
    """``"pft under DP: epsilon = 8.00, delta = 1e-05, privacy unit frame, accountant rdp"`` for
    every DP method of a run or an analysis (None without DP). Epsilon is the largest any subject
    spent (each subject is its own device and person)."""
    parts = []
    for method, entry in analysis_or_results["methods"].items():
        privacy = entry.get("privacy")
        if privacy:
            parts.append(
                f"{method} under DP: epsilon = {float(privacy['epsilon']):.2f}, "
                f"delta = {privacy['delta']:g}, privacy unit {privacy['privacy_unit']}, "
                f"accountant {privacy['accountant']}"
            )
    return "; ".join(parts) if parts else None


def summary_markdown(analysis: Mapping[str, Any]) -> str:
    """The summary table: mean macro-F1 with its CI, and against the baseline: the mean paired
    difference with its CI, the share of the source-to-oracle gap recovered, the Wilcoxon p-value
    (with the number of non-zero differences) and wins/ties/losses over subject-seeds."""
    base = analysis["baseline"] or "baseline"
    level = round(100 * float(analysis["settings"]["confidence"]))
    seeds = analysis["seeds"]
    lines = [
        f"| Setting | Method | mean F1 | {level}% CI | vs `{base}` [{level}% CI] | gap recovered | "
        f"Wilcoxon p (n) | W/T/L | per seed ({', '.join(str(s) for s in seeds)}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for method, entry in analysis["methods"].items():
        group = entry["group"] if entry["group"] != previous else ""
        previous = entry["group"]
        if "delta" in entry:
            versus = f"{entry['delta']:+.2f} {_ci(entry['delta_ci'])}" if entry["delta"] is not None else "-"
            wtl = f"{entry['wins']}/{entry['ties']}/{entry['losses']}"
        else:
            versus, wtl = "-", "-"
        per_seed = " / ".join(_num(entry["per_seed"].get(str(s))) for s in seeds)
        lines.append(
            f"| {group} | `{method}` | {_num(entry['mean_f1'])} | {_ci(entry['ci'])} | {versus} | "
            f"{_share(entry.get('gap_share'))} | {_p(entry.get('wilcoxon'))} | {wtl} | {per_seed} |"
        )
    return "\n".join(lines)


def per_class_markdown(analysis: Mapping[str, Any]) -> str | None:
    """Per-class F1 (mean over subject-seeds) per method; None without confusion matrices."""
    rows = [(m, e["per_class_f1"]) for m, e in analysis["methods"].items() if "per_class_f1" in e]
    if not rows:
        return None
    classes = analysis["classes"]
    lines = [
        "| Method | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for method, per_class in rows:
        lines.append(f"| `{method}` | " + " | ".join(_num(per_class.get(c)) for c in classes) + " |")
    return "\n".join(lines)


def summary_lines(analysis: Mapping[str, Any]) -> list[str]:
    """Short lines for a terminal: each method's mean and CI, the paired test, and the warnings."""
    level = round(100 * float(analysis["settings"]["confidence"]))
    units = analysis["units"]
    lines = [
        f"{level}% bootstrap CI over {units} subject-seed(s): "
        + "; ".join(f"{m} {_num(e['mean_f1'], 1)} {_ci(e['ci'])}" for m, e in analysis["methods"].items())
    ]
    base = analysis["baseline"]
    for method, entry in analysis["methods"].items():
        if "delta" in entry and entry["delta"] is not None and method != analysis["upper_bound"]:
            lines.append(
                f"{method} vs {base}: {entry['delta']:+.1f} F1 {_ci(entry['delta_ci'])}, gap recovered "
                f"{_share(entry.get('gap_share'))}, Wilcoxon p = {_p(entry.get('wilcoxon'))}, "
                f"W/T/L {entry['wins']}/{entry['ties']}/{entry['losses']}"
            )
    dp = dp_description(analysis)
    if dp:
        lines.append(dp)
    lines.extend(f"warning: {Finding.from_dict(f).line()}" for f in analysis["findings"])
    return lines


def findings_markdown(
    findings: Sequence[Mapping[str, Any]], heading: str | None = "**Warnings**"
) -> list[str]:
    """The warnings as a markdown list under ``heading`` (a line saying there are none when all
    checks passed)."""
    if not findings:
        return [
            "No warnings: every oracle is at least source-only, no method predicts one class for "
            "every frame of a subject, every subject has enough frames."
        ]
    items = [f"- {Finding.from_dict(f).line()}" for f in findings]
    return [heading, "", *items] if heading else items


def statistics_markdown(results: Mapping[str, Any], config: StatsConfig | None = None) -> list[str]:
    """The statistics section of ``pft simulate``'s report.md (one run: the units are its subjects)."""
    analysis = analyse_runs([results], config)
    level = round(100 * float(analysis["settings"]["confidence"]))
    lines = [
        "## Statistics and checks",
        "",
        f"Over the run's {analysis['units']} target subjects: mean macro-F1 with its {level}% percentile "
        "bootstrap CI, the mean paired difference to source-only with its CI, the share of the "
        "source-to-oracle gap recovered, the two-sided Wilcoxon signed-rank p-value (n = non-zero "
        "differences) and wins/ties/losses per subject (docs/benchmark.md says how each is computed).",
        "",
        summary_markdown(analysis),
        "",
    ]
    per_class = per_class_markdown(analysis)
    if per_class:
        lines += ["Per-class F1 (mean over subjects):", "", per_class, ""]
    dp = dp_description(analysis)
    if dp:
        lines += [f"Privacy: {dp}.", ""]
    lines += findings_markdown(analysis["findings"])
    return lines


# --- across profiles ------------------------------------------------------------------------------
def _source_free(method: str) -> bool:
    from pft.core.methods import method_spec

    try:
        return method_spec(method).source_free
    except KeyError:  # a method of an older run that is no longer registered
        return True


def across_profiles(
    groups: Sequence[Mapping[str, Any]], ours: str = "pft", alpha: float = 0.05, min_share: float = 0.5
) -> dict[str, Any] | None:
    """The methods' mean F1 per profile and over profiles, and ``ours`` against the four bars of
    docs/benchmark.md ("Across profiles") on each profile: beats the baseline with the paired test at
    ``p < alpha``; recovers at least ``min_share`` of the baseline-to-upper-bound gap; predicts a
    single class for no subject where the baseline does not; and, over the profiles' mean, is at
    least as good as every other source-free method. ``groups``: one role's groups (one per
    profile); None when there are none or ``ours`` is in none of them."""
    groups = [g for g in groups if ours in g["methods"]]
    if not groups:
        return None
    profiles = [str(g["profile"]) for g in groups]
    methods = [m for _, m in ordered_methods(list(dict.fromkeys(m for g in groups for m in g["methods"])))]
    table: dict[str, dict[str, float | None]] = {}
    for method in methods:
        row = {str(g["profile"]): g["methods"].get(method, {}).get("mean_f1") for g in groups}
        table[method] = row
    means: dict[str, float | None] = {}
    for m, row in table.items():
        present = [float(v) for v in row.values() if v is not None]
        means[m] = statistics.fmean(present) if len(present) == len(row) else None
    checks: dict[str, dict[str, Any]] = {}
    for group in groups:
        entry = group["methods"][ours]
        test = entry.get("wilcoxon") or {}
        base = group.get("baseline")
        collapsed: dict[tuple[int, str], bool] = {}
        for finding in group["findings"]:
            if finding["kind"] == "one_class":
                for subject in finding["subjects"]:
                    key = (int(finding["seed"]), str(subject))
                    if finding["method"] == ours:
                        collapsed.setdefault(key, True)
                    elif finding["method"] == base:
                        collapsed[key] = False  # the baseline already predicts one class there
        new_collapses = sorted(f"{s} (seed {seed})" for (seed, s), own in collapsed.items() if own)
        p = test.get("p_value")
        share = entry.get("gap_share")
        checks[str(group["profile"])] = {
            "delta": entry.get("delta"),
            "p_value": p,
            "beats_baseline": p is not None and float(p) < alpha and (entry.get("delta") or 0) > 0,
            "gap_share": share,
            "recovers_gap": share is not None and float(share) >= min_share,
            "collapses": new_collapses,
        }
    uppers = {g.get("upper_bound") for g in groups}
    others = [m for m in methods if m != ours and _source_free(m) and m not in uppers]
    best_other = max(
        ((m, v) for m in others if (v := means[m]) is not None), key=lambda kv: float(kv[1]), default=None
    )
    ours_mean = means[ours]
    return {
        "ours": ours,
        "profiles": profiles,
        "mean_f1": table,
        "mean_over_profiles": means,
        "checks": checks,
        "best_other": None if best_other is None else {"method": best_other[0], "mean_f1": best_other[1]},
        "best_on_mean": ours_mean is not None
        and (best_other is None or float(ours_mean) >= float(best_other[1] or 0) - 1e-9),
        "alpha": alpha,
        "min_share": min_share,
    }


def across_profiles_markdown(summary: Mapping[str, Any]) -> str:
    """Two tables: methods x profiles (+ the mean over profiles), and ``ours`` against the bars."""
    profiles = summary["profiles"]
    ours = summary["ours"]
    lines = [
        "| Method | " + " | ".join(f"`{p}`" for p in profiles) + " | mean over profiles |",
        "|---|" + "---|" * (len(profiles) + 1),
    ]
    for method, row in summary["mean_f1"].items():
        name = f"**`{method}`**" if method == ours else f"`{method}`"
        cells = [_num(row.get(p)) for p in profiles]
        overall = _num(summary["mean_over_profiles"][method])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall} |")
    best = summary["best_other"]
    yes = {True: "yes", False: "**no**"}
    lines += [
        "",
        f"`{ours}` against the bars (paired test at p < {summary['alpha']:g}; at least "
        f"{round(100 * summary['min_share'])} % of the gap; no new single-class subject):",
        "",
        "| profile | vs baseline | Wilcoxon p | beats baseline | gap recovered | >= bar "
        "| new single-class subjects |",
        "|---|---|---|---|---|---|---|",
    ]
    for profile, c in summary["checks"].items():
        delta = "-" if c["delta"] is None else f"{c['delta']:+.2f}"
        p = "-" if c["p_value"] is None else f"{c['p_value']:.3g}"
        lines.append(
            f"| `{profile}` | {delta} | {p} | {yes[c['beats_baseline']]} | {_share(c['gap_share'])} | "
            f"{yes[c['recovers_gap']]} | {', '.join(c['collapses']) or 'none'} |"
        )
    if best is not None:
        lines += [
            "",
            f"Mean over profiles: `{ours}` {_num(summary['mean_over_profiles'][ours])}, best other "
            f"source-free method `{best['method']}` {_num(best['mean_f1'])}: "
            + ("at least as good." if summary["best_on_mean"] else "**below it**."),
        ]
    return "\n".join(lines)
