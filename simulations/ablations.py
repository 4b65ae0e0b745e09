"""The paper's ablations and the reviewers' checks, runnable from the CLI (``pft ablate``).

- ``losses``: each stage-3 loss term removed in turn (the style term, off by default, added), stage 3
  removed (T0 only), and each stage-2
  loss term removed (T re-trained without it);
- ``pairing``: random vs cosine vs landmark pairing (stage 2 pairs and the stage-3 reference);
- ``dims``: feature dimension 64/128/256/512 (F re-trained with a projection to that size);
- ``weights``: a sweep of stage 2's two loss weights (lambda_style x lambda_expr);
- ``branches``: what the translator changes - mean cosine similarity of features for the same
  expression / different subjects vs the same subject / different expressions, before and after
  each person's translator (the slides' "expression vs identity branch" table).

Every variant is a full ``pft simulate``-style evaluation (same cohort, caches and seeds) of the
``pft`` method, with ``source_only`` as the reference row.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F_nn

from pft.core.atomic import atomic_write_text
from pft.core.frames import FrameSet
from pft.core.methods import METHODS, MethodSettings
from pft.core.metrics import macro_f1
from pft.core.seeding import subject_seed
from pft.simulations.experiment import ExperimentConfig, PreparedExperiment, prepare_experiment

AblationKind = Literal["losses", "pairing", "dims", "weights", "branches"]
ABLATIONS: tuple[AblationKind, ...] = ("losses", "pairing", "dims", "weights", "branches")


def _with(config: ExperimentConfig, **paths: Any) -> ExperimentConfig:
    """A copy of ``config`` with dotted-path overrides (``{"settings.pft.objective.lambda_style": 0}``)."""
    data = config.model_dump()
    for dotted, value in paths.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return ExperimentConfig.model_validate(data)


def _variants(kind: AblationKind, base: ExperimentConfig) -> dict[str, ExperimentConfig]:
    if kind == "losses":
        none = {"settings.pft.adapt.max_iterations": 0, "settings.pft.adapt.min_iterations": 0}
        return {
            "full": base,
            "stage 3 - consistency": _with(base, **{"settings.pft.objective.lambda_consistency": 0.0}),
            "stage 3 + style term (0.1; off by default)": _with(
                base, **{"settings.pft.objective.lambda_style": 0.1}
            ),
            "stage 3 - neutral calibration": _with(base, **{"settings.pft.objective.lambda_neutral": 0.0}),
            "no stage 3 (T0)": _with(base, **none),
            "stage 2 - style": _with(base, **{"pretrain.lambda_style": 0.0}),
            "stage 2 - expression (KL)": _with(base, **{"pretrain.lambda_expr": 0.0}),
            "stage 2 - CE": _with(base, **{"pretrain.lambda_ce": 0.0}),
        }
    if kind == "pairing":
        return {p: _with(base, **{"pretrain.pairing": p}) for p in ("random", "cosine", "landmark")}
    if kind == "dims":
        return {str(d): _with(base, **{"model.feature_dim": d}) for d in (64, 128, 256, 512)}
    if kind == "weights":
        return {
            f"style={s:g}, expr={e:g}": _with(base, **{"pretrain.lambda_style": s, "pretrain.lambda_expr": e})
            for s in (0.1, 1.0, 10.0)
            for e in (0.1, 1.0, 10.0)
        }
    return {"base": base}


def _evaluate(
    prepared: PreparedExperiment, settings: MethodSettings, seed: int
) -> dict[str, dict[str, float]]:
    """Mean/std macro-F1 of source_only and pft over the target subjects."""
    scores: dict[str, list[float]] = {"source_only": [], "pft": []}
    for k, subject in enumerate(prepared.targets):
        target = prepared.target(subject)
        if target is None:
            continue
        y = target.eval.labels.numpy()
        for method in scores:
            outcome = METHODS[method](prepared.model, target, settings, subject_seed(seed, k))
            scores[method].append(macro_f1(y, outcome.logits.argmax(1).numpy(), len(prepared.classes)))
    return {
        m: {
            "mean_f1": round(statistics.fmean(v), 2),
            "std_f1": round(statistics.pstdev(v), 2),
            "wins": sum(p > s for p, s in zip(scores["pft"], scores["source_only"], strict=True)),
            "per_subject": [round(x, 2) for x in v],  # type: ignore[dict-item]
        }
        for m, v in scores.items()
    }


def _mean_cosine(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cosine similarity between the class-mean features of each pair of groups."""
    sims = [float(F_nn.cosine_similarity(a.mean(0), b.mean(0), dim=0)) for a, b in groups]
    return statistics.fmean(sims) if sims else float("nan")


def branch_similarity(prepared: PreparedExperiment, settings: MethodSettings, seed: int) -> dict[str, Any]:
    """Cosine similarity of per-(subject, class) mean features, raw vs translated.

    ``fixed_expression``: same class, different subjects; ``fixed_subject``: same subject, different
    classes. A translator that removes identity raises the first and lowers the second.
    """
    raw: dict[tuple[str, int], torch.Tensor] = {}
    translated: dict[tuple[str, int], torch.Tensor] = {}
    for k, subject in enumerate(prepared.targets):
        target = prepared.target(subject)
        if target is None:
            continue
        outcome = METHODS["pft"](prepared.model, target, settings, subject_seed(seed, k))
        assert outcome.translated is not None
        ev: FrameSet = target.eval
        for c in range(len(prepared.classes)):
            mask = ev.labels == c
            if bool(mask.any()):
                raw[(subject, c)] = ev.features[mask]
                translated[(subject, c)] = outcome.translated[mask]

    def table(feats: Mapping[tuple[str, int], torch.Tensor]) -> dict[str, float]:
        keys = sorted(feats)
        same_expr = [(feats[a], feats[b]) for a, b in combinations(keys, 2) if a[1] == b[1] and a[0] != b[0]]
        same_subj = [(feats[a], feats[b]) for a, b in combinations(keys, 2) if a[0] == b[0] and a[1] != b[1]]
        return {
            "fixed_expression": round(_mean_cosine(same_expr), 3),
            "fixed_subject": round(_mean_cosine(same_subj), 3),
        }

    return {"before (F features)": table(raw), "after (personal T)": table(translated)}


def run_ablation(
    kind: AblationKind,
    base: ExperimentConfig,
    out_dir: Path,
    cache_root: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run one ablation; write ``<out_dir>/ablation_<kind>.json`` and ``.md``; return the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for name, variant in _variants(kind, base).items():
        config = variant.resolved()
        log(f"{kind}: {name}")
        prepared = prepare_experiment(config, cache_root, log=log)
        if kind == "branches":
            rows = branch_similarity(prepared, config.settings, config.seed)
        else:
            rows[name] = _evaluate(prepared, config.settings, config.seed)
    result = {"kind": kind, "profile": base.profile, "seed": base.seed, "rows": rows}
    atomic_write_text(out_dir / f"ablation_{kind}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / f"ablation_{kind}.md", ablation_markdown(result) + "\n")
    return result


def ablation_markdown(result: Mapping[str, Any]) -> str:
    """The ablation's table in Markdown."""
    rows = result["rows"]
    if result["kind"] == "branches":
        lines = ["| features | fixed expression | fixed subject |", "|---|---|---|"]
        lines += [
            f"| {k} | {v['fixed_expression']:.3f} | {v['fixed_subject']:.3f} |" for k, v in rows.items()
        ]
        return "\n".join(lines)
    lines = [
        "| variant | PFT mean F1 | PFT std | subjects where PFT > source-only | source-only mean F1 |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        pft, src = r["pft"], r["source_only"]
        wins = f"{pft['wins']}/{len(pft['per_subject'])}"
        mean, std = pft["mean_f1"], pft["std_f1"]
        lines.append(f"| {name} | {mean:.2f} | {std:.2f} | {wins} | {src['mean_f1']:.2f} |")
    return "\n".join(lines)
