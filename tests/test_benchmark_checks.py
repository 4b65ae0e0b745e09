"""The checks' warnings (each fires on a crafted run and stays quiet otherwise), the analysis of
runs over subject-seeds against hand-computed values, the seed roles kept apart, DP in titles and
summaries, and `pft simulate`'s summary lines."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pft.core.metrics import macro_f1
from pft.core.results import summarise_method
from pft.simulations.analysis import analyse_runs, statistics_markdown, summary_lines
from pft.simulations.benchmark_report import report_markdown
from pft.simulations.checks import CheckConfig, check_run
from pft.simulations.experiment import ExperimentResult

CLASSES = ["neutral", "pain"]


def _labels(cm: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    y, p = [], []
    for t, row in enumerate(cm):
        for q, n in enumerate(row):
            y += [t] * n
            p += [q] * n
    return np.array(y), np.array(p)


def _run(seed: int, confusions: dict[str, dict[str, list[list[int]]]], adapt: int = 48) -> dict[str, Any]:
    """A results.json as run_experiment writes it, from per-method, per-subject confusion matrices."""
    methods = {}
    for method, per_subject in confusions.items():
        scores = {}
        for subject, cm in per_subject.items():
            y, p = _labels(cm)
            scores[subject] = {"f1": macro_f1(y, p, 2), "accuracy": 100.0 * float((y == p).mean())}
        methods[method] = summarise_method(scores, 10, 0.1)
    subjects = sorted({s for c in confusions.values() for s in c})
    return {
        "profile": "biovid",
        "seed": seed,
        "classes": CLASSES,
        "methods": methods,
        "confusion": confusions,
        "frames": {s: {"adapt": adapt, "oracle": 96, "eval": 96} for s in subjects},
        "subjects": {"source": 4, "target": len(subjects)},
    }


GOOD = [[40, 8], [10, 38]]  # F1 81.2
FAIR = [[30, 18], [20, 28]]  # F1 60.4
WEAK = [[26, 22], [24, 24]]  # F1 52.1


def _healthy(seed: int = 0) -> dict[str, Any]:
    return _run(
        seed,
        {
            "source_only": {"S1": WEAK, "S2": FAIR},
            "pft": {"S1": FAIR, "S2": GOOD},
            "oracle": {"S1": GOOD, "S2": GOOD},
        },
    )


def test_healthy_run_has_no_findings() -> None:
    assert check_run(_healthy()) == []


def test_oracle_below_source_only_fires() -> None:
    run = _run(3, {"source_only": {"S1": GOOD, "S2": FAIR}, "oracle": {"S1": FAIR, "S2": WEAK}})
    (finding,) = check_run(run)
    assert finding.kind == "oracle_below_source" and finding.seed == 3 and finding.method == "oracle"
    assert "56.23 < source_only 70.82" in finding.message
    assert finding.line().startswith("[biovid seed 3] oracle")


def test_one_class_fires_per_method_and_lists_the_subjects() -> None:
    run = _healthy()
    all_neutral = [[48, 0], [48, 0]]
    run = _run(
        0,
        {
            "source_only": {"S1": WEAK, "S2": FAIR},
            "pft": {"S1": all_neutral, "S2": all_neutral, "S3": GOOD},
            "oracle": {"S1": GOOD, "S2": GOOD, "S3": GOOD},
        },
    )
    run["frames"]["S3"] = {"adapt": 48, "oracle": 96, "eval": 96}
    (finding,) = check_run(run)
    assert finding.kind == "one_class" and finding.method == "pft" and finding.subjects == ("S1", "S2")
    assert "'neutral'" in finding.message and "2/3 subject(s)" in finding.message


def test_one_class_is_quiet_when_the_subject_shows_one_class_only() -> None:
    run = _run(
        0,
        {
            "source_only": {"S1": [[48, 0], [0, 0]], "S2": FAIR},
            "oracle": {"S1": [[48, 0], [0, 0]], "S2": GOOD},
        },
    )
    # no one-class warning (the only class shown is predicted); the missing class is too few frames
    assert [f.kind for f in check_run(run)] == ["few_frames"]


def test_few_frames_fires_for_adapt_eval_and_skipped_subjects() -> None:
    few_eval = [[5, 3], [10, 38]]  # 8 neutral eval frames
    run = _run(
        0, {"source_only": {"S1": few_eval, "S2": FAIR}, "oracle": {"S1": few_eval, "S2": GOOD}}, adapt=12
    )
    run["frames"]["S9"] = {"oracle": 96}  # no usable adapt frames: run_experiment skipped it
    skipped, adapt, evaluation = check_run(run)
    assert {f.kind for f in (skipped, adapt, evaluation)} == {"few_frames"}
    assert skipped.subjects == ("S9",) and "1/3 target subject(s) skipped" in skipped.message
    assert adapt.subjects == ("S1", "S2") and adapt.message.endswith("usable adapt frames: S1 (12), S2 (12)")
    assert evaluation.subjects == ("S1",) and evaluation.message.endswith(
        "eval frames of a class: S1 (neutral 8)"
    )
    assert check_run(run, CheckConfig(min_adapt_frames=12, min_eval_frames_per_class=8)) == [skipped]


def test_few_frames_is_one_finding_per_kind_naming_at_most_eight_subjects() -> None:
    names = [f"S{k:02d}" for k in range(12)]
    run = _run(0, {"source_only": dict.fromkeys(names, FAIR), "oracle": dict.fromkeys(names, GOOD)}, adapt=10)
    (finding,) = check_run(run)
    assert len(finding.subjects) == 12
    assert finding.message.endswith("S07 (10) and 4 more") and "S08" not in finding.message


def test_runs_without_confusion_matrices_say_what_was_not_checked() -> None:
    run = _healthy()
    del run["confusion"], run["frames"]  # as the Flower engine's results
    (finding,) = check_run(run)
    assert finding.kind == "unchecked"


# --- the analysis over subject-seeds ----------------------------------------------------------------
def test_analysis_of_two_seeds_by_hand() -> None:
    a, b = _healthy(0), _healthy(1)
    b["confusion"]["pft"]["S1"] = WEAK  # seed 1, S1: pft ties source-only
    b["methods"]["pft"] = summarise_method(
        {
            "S1": {"f1": b["methods"]["source_only"]["per_subject"]["S1"]["f1"], "accuracy": 0.0},
            "S2": b["methods"]["pft"]["per_subject"]["S2"],
        },
        10,
        0.1,
    )
    out = analyse_runs([b, a])
    assert out["role"] == "test" and out["seeds"] == [0, 1] and out["units"] == 4
    f = {name: macro_f1(*_labels(cm), 2) for name, cm in (("good", GOOD), ("fair", FAIR), ("weak", WEAK))}
    src, pft, orc = out["methods"]["source_only"], out["methods"]["pft"], out["methods"]["oracle"]
    assert list(out["methods"]) == ["source_only", "pft", "oracle"]  # the paper's row order
    assert src["mean_f1"] == pytest.approx((f["weak"] + f["fair"]) / 2, abs=1e-4)
    assert pft["mean_f1"] == pytest.approx((f["fair"] + 2 * f["good"] + f["weak"]) / 4, abs=1e-4)
    assert pft["per_subject"]["S1"] == pytest.approx((f["fair"] + f["weak"]) / 2, abs=1e-4)  # seeds averaged
    assert pft["per_seed"] == {
        "0": pytest.approx((f["fair"] + f["good"]) / 2, abs=1e-4),
        "1": pytest.approx((f["weak"] + f["good"]) / 2, abs=1e-4),
    }
    assert (pft["wins"], pft["ties"], pft["losses"]) == (3, 1, 0)
    assert pft["wilcoxon"]["n_nonzero"] == 3 and pft["wilcoxon"]["method"] == "enumerated"
    # gap share on the means over the same units: (pft - source) / (oracle - source)
    gap = orc["mean_f1"] - src["mean_f1"]
    assert pft["gap_share"] == pytest.approx((pft["mean_f1"] - src["mean_f1"]) / gap, abs=1e-3)
    assert orc["gap_share"] == 1.0 and src["gap_share"] == 0.0
    assert pft["delta"] == pytest.approx(pft["mean_f1"] - src["mean_f1"], abs=1e-3)
    low, high = pft["ci"]
    assert low <= pft["mean_f1"] <= high
    # per-class F1: the mean over subject-seeds of each unit's per-class F1
    neutral = [2 * cm[0][0] / (sum(cm[0]) + cm[0][0] + cm[1][0]) * 100 for cm in (FAIR, GOOD, WEAK, GOOD)]
    assert pft["per_class_f1"]["neutral"] == pytest.approx(np.mean(neutral), abs=1e-3)
    assert pft["confusion"] == (np.array(FAIR) + np.array(GOOD) * 2 + np.array(WEAK)).tolist()


def test_validation_and_test_seeds_are_never_analysed_together() -> None:
    with pytest.raises(ValueError, match="never analysed together"):
        analyse_runs([_healthy(2), _healthy(100)])
    assert analyse_runs([_healthy(100), _healthy(101)])["role"] == "validation"


def _dp(run: dict[str, Any], epsilon: float) -> dict[str, Any]:
    run = copy.deepcopy(run)
    run["methods"]["pft"]["privacy"] = {
        "epsilon": epsilon,
        "delta": 1e-5,
        "privacy_unit": "video",
        "accountant": "prv",
        "per_subject": {"S1": epsilon, "S2": epsilon / 2},
    }
    return run


def test_dp_is_stated_in_titles_and_summaries() -> None:
    dp_runs = [_dp(_healthy(0), 3.0), _dp(_healthy(1), 4.0)]
    group = analyse_runs(dp_runs)
    expected = "pft under DP: epsilon = 4.00, delta = 1e-05, privacy unit video, accountant prv"
    assert expected in summary_lines(group)
    report = report_markdown(
        {
            "config": {
                "profiles": ["biovid"],
                "seeds": [0, 1],
                "experiment": {"methods": ["pft"], "engine": "loop"},
            },
            "groups": [group],
            "findings": [],
            "runs": [],
            "seconds": 0.0,
        },
        {},
    )
    title = report.splitlines()[0]
    assert title.startswith("# Benchmark: biovid x seeds 0, 1") and expected in title
    assert expected.replace("4.00", "3.00") in "\n".join(statistics_markdown(dp_runs[0]))
    assert not any("DP" in line for line in summary_lines(analyse_runs([_healthy(0)])))


def test_simulate_summary_has_the_ci_and_warning_lines() -> None:
    run = _run(
        3,
        {
            "source_only": {"S1": GOOD, "S2": FAIR},
            "pft": {"S1": GOOD, "S2": GOOD},
            "oracle": {"S1": FAIR, "S2": WEAK},
        },
    )
    lines = ExperimentResult(run, Path("runs/x")).summary().splitlines()
    assert lines[0].startswith("biovid seed 3:")
    assert lines[1].startswith("95% bootstrap CI over 2 subject-seed(s): source_only 70.8 [")
    assert any(line.startswith("pft vs source_only: +") for line in lines)
    assert lines[-1].startswith("warning: [biovid seed 3] oracle 56.23 < source_only 70.82")
    quiet = ExperimentResult(_healthy(), Path("runs/x")).summary()
    assert "warning" not in quiet


def _profile(run: dict[str, Any], profile: str) -> dict[str, Any]:
    run = copy.deepcopy(run)
    run["profile"] = profile
    return run


def test_across_profiles_by_hand() -> None:
    """Means per profile and over profiles, and pft against the bars, from hand-made confusions."""
    from pft.simulations.analysis import across_profiles, across_profiles_markdown

    f = {name: macro_f1(*_labels(cm), 2) for name, cm in (("good", GOOD), ("fair", FAIR), ("weak", WEAK))}
    ONE = [[48, 0], [48, 0]]  # every frame "neutral"
    # profile a: pft wins on both subjects; profile b: pft predicts one class on S2, source-only does not
    a = _run(0, {"source_only": {"S1": WEAK, "S2": FAIR}, "pft": {"S1": GOOD, "S2": GOOD},
                 "adabn": {"S1": FAIR, "S2": FAIR}, "oracle": {"S1": GOOD, "S2": GOOD}})  # fmt: skip
    b = _run(0, {"source_only": {"S1": WEAK, "S2": WEAK}, "pft": {"S1": FAIR, "S2": ONE},
                 "adabn": {"S1": GOOD, "S2": GOOD}, "oracle": {"S1": GOOD, "S2": GOOD}})  # fmt: skip
    groups = [analyse_runs([_profile(a, "pa")]), analyse_runs([_profile(b, "pb")])]
    out = across_profiles(groups)
    assert out is not None and out["profiles"] == ["pa", "pb"]
    f_one = macro_f1(*_labels(ONE), 2)
    assert out["mean_f1"]["pft"]["pa"] == pytest.approx(f["good"], abs=1e-3)
    assert out["mean_f1"]["pft"]["pb"] == pytest.approx((f["fair"] + f_one) / 2, abs=1e-3)
    pft_mean = (f["good"] + (f["fair"] + f_one) / 2) / 2
    adabn_mean = (f["fair"] + f["good"]) / 2
    assert out["mean_over_profiles"]["pft"] == pytest.approx(pft_mean, abs=1e-3)
    assert out["mean_over_profiles"]["adabn"] == pytest.approx(adabn_mean, abs=1e-3)
    # the oracle (the upper bound) is no source-free method; adabn beats source-only on the mean
    assert out["best_other"]["method"] == "adabn"
    assert out["best_on_mean"] == (pft_mean >= adabn_mean)
    pa, pb = out["checks"]["pa"], out["checks"]["pb"]
    # two subjects cannot give p < 0.05 with a two-sided signed-rank test (smallest p = 0.5)
    assert pa["p_value"] == pytest.approx(0.5) and not pa["beats_baseline"]
    assert pa["gap_share"] == pytest.approx(1.0) and pa["recovers_gap"]
    assert pa["collapses"] == [] and pb["collapses"] == ["S2 (seed 0)"]
    share_b = ((f["fair"] + f_one) / 2 - f["weak"]) / (f["good"] - f["weak"])
    assert pb["gap_share"] == pytest.approx(share_b, abs=1e-3) and pb["recovers_gap"] == (share_b >= 0.5)
    text = across_profiles_markdown(out)
    assert "| **`pft`** |" in text and "S2 (seed 0)" in text and "`adabn`" in text


def test_a_subject_where_source_only_already_predicts_one_class_is_no_collapse() -> None:
    from pft.simulations.analysis import across_profiles

    ONE = [[48, 0], [48, 0]]
    run = _run(0, {"source_only": {"S1": ONE, "S2": WEAK}, "pft": {"S1": ONE, "S2": GOOD},
                   "oracle": {"S1": GOOD, "S2": GOOD}})  # fmt: skip
    out = across_profiles([analyse_runs([run])])
    assert out is not None and out["checks"]["biovid"]["collapses"] == []
    assert out["best_other"]["method"] == "source_only" and out["best_on_mean"]
