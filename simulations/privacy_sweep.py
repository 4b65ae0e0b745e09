"""Utility vs privacy: PFT's mean F1 for a list of epsilons (and without DP), beside source-only.

Runs the ``pft simulate`` experiment (same cohort, cached source model, same seeds) once per
epsilon with ``settings.pft.dp`` set, and writes ``privacy_sweep.json``, ``privacy_sweep.md`` (a
table) and ``privacy_sweep.png`` (F1 vs epsilon) in the output folder::

    python -m pft.simulations.privacy_sweep --cache-dir /tmp/pftc_dp --out runs/privacy
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from pft.core.privacy import DPConfig, PrivacyUnit
from pft.simulations.experiment import ExperimentConfig, run_experiment

DEFAULT_EPSILONS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, math.inf)


def sweep(
    out: Path,
    cache_dir: Path | None,
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS,
    unit: PrivacyUnit = "frame",
    delta: float = 1e-5,
    profile: str = "biovid",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One experiment per epsilon (``inf`` = no DP); returns one row per run."""
    rows: list[dict[str, Any]] = []
    for eps in epsilons:
        dp = None if math.isinf(eps) else DPConfig(epsilon=eps, delta=delta, privacy_unit=unit)
        base = ExperimentConfig.model_validate({"profile": profile, "seed": seed})
        pft = base.settings.pft.model_copy(update={"dp": dp})
        config = base.model_copy(
            update={
                "methods": ("source_only", "pft"),
                "settings": base.settings.model_copy(update={"pft": pft}),
                "embedding_plot": False,
            }
        )
        name = "no_dp" if dp is None else f"eps_{eps:g}_{unit}"
        result = run_experiment(config, out / name, cache_dir)
        methods = result.results["methods"]
        privacy = methods["pft"].get("privacy", {})
        rows.append(
            {
                "epsilon_target": eps,
                "privacy_unit": unit if dp is not None else None,
                "epsilon_spent": privacy.get("epsilon", math.inf),
                "group_epsilon": privacy.get("group_epsilon"),
                "delta": delta if dp is not None else None,
                "accountant": privacy.get("accountant"),
                "noise_multiplier": privacy.get("noise_multiplier"),
                "pft_f1": methods["pft"]["mean_f1"],
                "pft_std": methods["pft"]["std_f1"],
                "source_only_f1": methods["source_only"]["mean_f1"],
                "adapt_seconds": methods["pft"]["adapt_seconds"],
                "adapt_iterations": methods["pft"]["adapt_iterations"],
            }
        )
    return rows


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    """``privacy_sweep.json``, a markdown table and the F1-vs-epsilon plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_sweep.json").write_text(json.dumps(rows, indent=1, default=str))
    base = next((r for r in rows if math.isinf(r["epsilon_target"])), None)
    lines = [
        "| epsilon (target) | unit | epsilon spent | clip-level bound (group) | noise sigma | PFT F1 | "
        "source-only F1 | adapt s / subject | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sigma = r["noise_multiplier"]
        lines.append(
            f"| {r['epsilon_target']:g} | {r['privacy_unit'] or '-'} | {r['epsilon_spent']:.2f} | "
            f"{'-' if r['group_epsilon'] is None else format(r['group_epsilon'], '.0f')} | "
            f"{'-' if sigma is None else f'{sigma[0]:.2f}-{sigma[1]:.2f}'} | {r['pft_f1']:.1f} +- "
            f"{r['pft_std']:.1f} | {r['source_only_f1']:.1f} | {r['adapt_seconds']:.3f} | "
            f"{r['adapt_iterations']:.0f} |"
        )
    if base is not None:
        lines.append("")
        lines.append(
            f"Wall time of DP adaptation relative to non-DP ({base['adapt_seconds']:.3f} s): "
            + ", ".join(
                f"eps {r['epsilon_target']:g}: {r['adapt_seconds'] / max(base['adapt_seconds'], 1e-9):.2f}x"
                for r in rows
                if not math.isinf(r["epsilon_target"])
            )
        )
    (out / "privacy_sweep.md").write_text("\n".join(lines) + "\n")
    finite = [r for r in rows if not math.isinf(r["epsilon_target"])]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([r["epsilon_target"] for r in finite], [r["pft_f1"] for r in finite], "o-", label="PFT + DP-SGD")
    if base is not None:
        ax.axhline(base["pft_f1"], color="C0", ls="--", label="PFT, no DP (eps = inf)")
    ax.axhline(rows[0]["source_only_f1"], color="C3", ls=":", label="source-only")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"epsilon per subject ({finite[0]['privacy_unit'] if finite else ''}-level, delta 1e-5)")
    ax.set_ylabel("mean macro-F1 (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "privacy_sweep.png", dpi=120)
    plt.close(fig)


def main() -> None:
    """Command line: ``python -m pft.simulations.privacy_sweep [--epsilons 1,2,4,8,inf] ...``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/privacy"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--epsilons", default="1,2,4,8,inf")
    ap.add_argument("--unit", default="frame", choices=["frame", "video", "person"])
    ap.add_argument("--profile", default="biovid")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    eps = tuple(float(e) for e in args.epsilons.split(","))
    rows = sweep(args.out, args.cache_dir, eps, args.unit, profile=args.profile, seed=args.seed)
    write_outputs(rows, args.out)
    print((args.out / "privacy_sweep.md").read_text())


if __name__ == "__main__":
    main()
