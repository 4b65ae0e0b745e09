"""Checks of one run's results that say when a comparison means little (warnings, not errors).

``check_run(results)`` reads a ``results.json`` dict (``pft simulate``'s schema) and returns
:class:`Finding` s, printed by ``pft simulate`` / ``pft benchmark`` and written into their reports:

- ``oracle_below_source``: the oracle's mean macro-F1 is below source-only's on this (profile,
  seed): the "upper bound" is none, and no method comparison on this run means much;
- ``one_class``: a method predicts one class for every eval frame of a subject whose eval frames
  show more than one class (one finding per method, listing the subjects);
- ``few_frames``: target subjects skipped altogether (no usable adapt or eval frames), with fewer
  usable ``adapt`` frames than ``CheckConfig.min_adapt_frames``, or with fewer ``eval`` frames of
  some class than ``CheckConfig.min_eval_frames_per_class`` (their F1 rests on a handful of
  frames) - one finding per kind and run, listing the subjects;
- ``unchecked``: the run has no per-subject confusion matrices (the Flower engine's nodes send
  only allow-listed metrics), so the one-class and per-class-frame checks could not run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pft.core.config import FrozenConfig

FindingKind = Literal["oracle_below_source", "one_class", "few_frames", "unchecked"]


class CheckConfig(FrozenConfig):
    """Thresholds of the checks (frames are usable face frames after decoding and cropping)."""

    min_adapt_frames: int = Field(16, ge=1)
    min_eval_frames_per_class: int = Field(16, ge=1)


@dataclass(frozen=True)
class Finding:
    """One warning about one run: what, where, and a sentence for people."""

    kind: FindingKind
    profile: str
    seed: int
    message: str
    method: str | None = None
    subjects: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict."""
        out = asdict(self)
        out["subjects"] = list(self.subjects)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The inverse of :meth:`as_dict`."""
        return cls(
            data["kind"],
            data["profile"],
            int(data["seed"]),
            data["message"],
            data.get("method"),
            tuple(data.get("subjects", ())),
        )

    def line(self) -> str:
        """``[profile seed S] message``: the line printed and written into reports."""
        return f"[{self.profile} seed {self.seed}] {self.message}"


SHOWN_SUBJECTS = 8
"""At most this many subjects are named in a finding's message (all are in ``Finding.subjects``)."""


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_SUBJECTS])
    return shown + (f" and {len(items) - SHOWN_SUBJECTS} more" if len(items) > SHOWN_SUBJECTS else "")


def run_confusions(results: Mapping[str, Any], method: str) -> dict[str, np.ndarray]:
    """``subject -> (K, K)`` eval confusion matrix of ``method`` in a run (empty when not recorded)."""
    recorded: Mapping[str, Any] = results.get("confusion", {}).get(method, {})
    return {subject: np.asarray(cm, dtype=np.int64) for subject, cm in recorded.items()}


def check_run(results: Mapping[str, Any], config: CheckConfig | None = None) -> list[Finding]:
    """Every finding on one run's results (``results.json`` of ``pft simulate``).

    Parameters
    ----------
    results:
        The run's results dict.
    config:
        Thresholds (default :class:`CheckConfig`).

    Returns
    -------
    list of Finding
        In the order oracle, one-class (by method), few frames, unchecked; empty when all is well.
    """
    config = config or CheckConfig()
    profile, seed = str(results["profile"]), int(results["seed"])
    classes: list[str] = list(results.get("classes", []))
    methods: Mapping[str, Any] = results["methods"]
    findings: list[Finding] = []

    if "oracle" in methods and "source_only" in methods:
        oracle, source = float(methods["oracle"]["mean_f1"]), float(methods["source_only"]["mean_f1"])
        if oracle < source:
            findings.append(
                Finding(
                    "oracle_below_source",
                    profile,
                    seed,
                    f"oracle {oracle:.2f} < source_only {source:.2f} mean macro-F1: the upper bound is "
                    "below source-only, so method comparisons on this run mean little",
                    "oracle",
                )
            )

    any_confusion = False
    eval_counts: dict[str, np.ndarray] = {}
    for method in methods:
        confusions = run_confusions(results, method)
        any_confusion = any_confusion or bool(confusions)
        stuck: list[str] = []
        predicted: list[str] = []
        for subject, cm in sorted(confusions.items()):
            eval_counts.setdefault(subject, cm.sum(1))
            columns = np.flatnonzero(cm.sum(0))
            if len(columns) == 1 and np.count_nonzero(cm.sum(1)) > 1:
                stuck.append(subject)
                k = int(columns[0])
                predicted.append(classes[k] if k < len(classes) else str(k))
        if stuck:
            names = sorted(set(predicted))
            findings.append(
                Finding(
                    "one_class",
                    profile,
                    seed,
                    f"{method} predicts one class ({', '.join(repr(n) for n in names)}) for every eval frame "
                    f"of {len(stuck)}/{len(confusions)} subject(s): {_names(stuck)}",
                    method,
                    tuple(stuck),
                )
            )

    frames: Mapping[str, Mapping[str, int]] = results.get("frames", {})
    scored = {s for entry in methods.values() for s in entry["per_subject"]}
    skipped = sorted(s for s in frames if s not in scored)
    few_adapt = {
        s: int(c["adapt"])
        for s, c in sorted(frames.items())
        if s in scored and "adapt" in c and int(c["adapt"]) < config.min_adapt_frames
    }
    few_eval = {
        s: ", ".join(
            f"{classes[k] if k < len(classes) else k} {int(n)}"
            for k, n in enumerate(counts)
            if n < config.min_eval_frames_per_class
        )
        for s, counts in sorted(eval_counts.items())
        if (counts < config.min_eval_frames_per_class).any()
    }
    n_targets = len(set(frames) | set(eval_counts))
    if skipped:
        findings.append(
            Finding(
                "few_frames",
                profile,
                seed,
                f"{len(skipped)}/{n_targets} target subject(s) skipped (no usable adapt or eval frames): "
                + _names(skipped),
                None,
                tuple(skipped),
            )
        )
    if few_adapt:
        findings.append(
            Finding(
                "few_frames",
                profile,
                seed,
                f"{len(few_adapt)}/{n_targets} subject(s) with fewer than {config.min_adapt_frames} usable "
                "adapt frames: " + _names([f"{s} ({n})" for s, n in few_adapt.items()]),
                None,
                tuple(few_adapt),
            )
        )
    if few_eval:
        findings.append(
            Finding(
                "few_frames",
                profile,
                seed,
                f"{len(few_eval)}/{n_targets} subject(s) with fewer than {config.min_eval_frames_per_class} "
                "eval frames of a class: " + _names([f"{s} ({low})" for s, low in few_eval.items()]),
                None,
                tuple(few_eval),
            )
        )

    if methods and not any_confusion:
        findings.append(
            Finding(
                "unchecked",
                profile,
                seed,
                "no per-subject confusion matrices in this run (the Flower engine's nodes send only "
                "allow-listed metrics): the one-class and eval-frames-per-class checks did not run",
            )
        )
    return findings
