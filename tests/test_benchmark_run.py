"""`pft benchmark` on a tiny real cohort: a finished run is reused without running, a run killed
(SIGKILL, in a real process) in stage 3 or before its marker restarts cleanly and gives the
uninterrupted run's numbers, a changed config runs again, a busy folder is refused; the CLI; and
no source-free method ever sees a target's `oracle` frames or uses its `eval` frames to adapt."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import pft.simulations.benchmark as bench
from pft.cli.main import app
from pft.core.methods import METHODS, MethodOutcome, Runner, TargetData, method_spec
from pft.simulations.benchmark import BenchmarkConfig, BenchmarkError, BenchmarkResult, run_benchmark
from pft.simulations.experiment import ExperimentConfig, run_experiment

pytestmark = pytest.mark.slow

RUN_FIELDS = {
    "embedding_plot": False,
    "cohort": {"frame_size": 64, "frames_per_clip": 8},
    "model": {"width": 8, "translator_hidden": 32, "image_size": 32},
    "source_train": {"epochs": 6},
    "pretrain": {"iterations": 20},
    "settings": {
        "pft": {"adapt": {"max_iterations": 30, "min_iterations": 30}},
        "oracle": {"adapt": {"max_iterations": 5, "min_iterations": 5}},
        # the image-space rows, only run by the leak test below (which runs every method)
        "sfda_it": {
            "generator_adapt": {"max_iterations": 3, "min_iterations": 3},
            "adapt": {"max_iterations": 3, "min_iterations": 3},
        },
        "sfit": {
            "generator_adapt": {"max_iterations": 3, "min_iterations": 3},
            "shot": {"adapt": {"max_iterations": 3, "min_iterations": 3}},
        },
        "dsfda": {
            "generator_adapt": {"max_iterations": 3, "min_iterations": 3},
            "adapt": {"max_iterations": 3, "min_iterations": 3},
        },
    },
}
METHOD_LIST = ["source_only", "pft", "oracle", "neutral_norm"]
SEED = 5
CONFIG = BenchmarkConfig.model_validate(
    {
        "profiles": ["biovid"],
        "seeds": [SEED],
        "experiment": {**RUN_FIELDS, "source_subjects": 4, "target_subjects": 2, "methods": METHOD_LIST},
    }
)
RUN = f"biovid-seed{SEED}"

# Runs the benchmark in its own process and kills that process with SIGKILL (no clean-up of any
# kind) at a chosen point: "stage3" after the first target is scored, "marker" when the finished
# run's complete.json is about to be written (results.json and report.md are already there).
DRIVER = """
import os, signal, sys
from pathlib import Path

import pft.simulations.benchmark as bench


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def progress(description, total):
    def step(done, new_total):
        if WHERE == "stage3" and "stage 3" in description and done >= 1:
            die()

    return step


if __name__ == "__main__":
    config = bench.BenchmarkConfig.model_validate_json(Path(sys.argv[1]).read_text())
    out, cache, WHERE = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    if WHERE == "marker":
        real = bench.atomic_write_text

        def write(path, text):
            if Path(path).name == "complete.json":
                die()
            return real(path, text)

        bench.atomic_write_text = write
    bench.run_benchmark(config, out, cache, progress=progress)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BenchmarkResult, Path]]:
    root = tmp_path_factory.mktemp("benchmark")
    cache = root / "cache"
    yield run_benchmark(CONFIG, root / "reference", cache), cache


def _numbers(results: dict[str, Any]) -> dict[str, Any]:
    return {k: results[k] for k in ("methods", "confusion", "frames", "classes", "subjects")} | {
        "methods": {m: e["per_subject"] for m, e in results["methods"].items()}
    }


def test_reference_run_wrote_everything(world: tuple[BenchmarkResult, Path]) -> None:
    result, _ = world
    out = result.out_dir
    assert [r.status for r in result.runs] == ["ran"]
    for name in ("benchmark.json", "report.md", "benchmark-config.json", "errorbars_test.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion_biovid_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [".partial", RUN]
    assert list((out / "runs" / ".partial").iterdir()) == []
    (group,) = result.benchmark["groups"]
    assert group["profile"] == "biovid" and group["role"] == "test" and group["units"] == 2
    assert list(group["methods"]) == ["source_only", "neutral_norm", "pft", "oracle"]
    # a real comparison, not a degenerate one: the methods do not all give the same numbers
    assert len({json.dumps(e["per_subject"]) for e in group["methods"].values()}) > 1
    report = (out / "report.md").read_text()
    assert "| Setting | Method | S005 | S006 | Average |" in report and "Wilcoxon p (n)" in report
    stored = json.loads((out / "benchmark.json").read_text())
    assert stored["groups"] == result.benchmark["groups"]


def test_finished_run_is_reused_without_running(
    world: tuple[BenchmarkResult, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    result, cache = world
    results_json = result.out_dir / "runs" / RUN / "results.json"
    before = results_json.stat().st_mtime_ns

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(bench, "run_experiment", refuse)
    again = run_benchmark(CONFIG, result.out_dir, cache)
    assert [r.status for r in again.runs] == ["reused"]
    assert results_json.stat().st_mtime_ns == before
    assert again.benchmark["groups"] == result.benchmark["groups"]


@pytest.mark.parametrize("where", ["stage3", "marker"])
def test_killed_run_restarts_cleanly(world: tuple[BenchmarkResult, Path], tmp_path: Path, where: str) -> None:
    result, cache = world
    out = tmp_path / "out"
    config_file = tmp_path / "config.json"
    config_file.write_text(CONFIG.model_dump_json())
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), str(config_file), str(out), str(cache), where],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = out / "runs" / ".partial" / RUN
    assert (partial / "config.json").is_file()
    assert (partial / "results.json").is_file() == (where == "marker")
    assert not (out / "runs" / RUN).exists() and not (out / "benchmark.json").exists()

    resumed = run_benchmark(CONFIG, out, cache)
    assert [r.status for r in resumed.runs] == ["restarted"]
    assert not partial.exists() and (out / "runs" / RUN / "complete.json").is_file()
    assert _numbers(resumed.runs[0].results) == _numbers(result.runs[0].results)
    assert resumed.benchmark["groups"] == result.benchmark["groups"]


def test_changed_config_runs_again(world: tuple[BenchmarkResult, Path], tmp_path: Path) -> None:
    result, cache = world
    out = tmp_path / "out"
    shutil.copytree(result.out_dir, out)
    fewer = CONFIG.model_copy(
        update={"experiment": CONFIG.experiment.model_copy(update={"methods": ("source_only", "oracle")})}
    )
    again = run_benchmark(fewer, out, cache)
    assert [r.status for r in again.runs] == ["replaced"]
    assert list(again.benchmark["groups"][0]["methods"]) == ["source_only", "oracle"]
    assert json.loads((out / "runs" / RUN / "config.json").read_text())["methods"] == [
        "source_only",
        "oracle",
    ]
    assert sorted(p.name for p in (out / "runs" / ".partial").iterdir()) == []


def _cli_args(tmp_path: Path, out: Path, cache: Path) -> list[str]:
    fields = tmp_path / "fields.yaml"
    fields.write_text(yaml.safe_dump(RUN_FIELDS))
    return [
        "benchmark",
        "--profiles",
        "biovid",
        "--seeds",
        str(SEED),
        "--methods",
        ",".join(METHOD_LIST),
        "--source-subjects",
        "4",
        "--target-subjects",
        "2",
        "--config",
        str(fields),
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        "--no-progress",
    ]


def test_cli_reuses_the_run_and_prints_the_statistics(
    world: tuple[BenchmarkResult, Path], tmp_path: Path
) -> None:
    result, cache = world
    out = tmp_path / "out"
    shutil.copytree(result.out_dir, out)
    outcome = CliRunner().invoke(app, _cli_args(tmp_path, out, cache))
    assert outcome.exit_code == 0, outcome.output
    assert f"biovid (test seeds {SEED}):" in outcome.output
    assert "95% bootstrap CI over 2 subject-seed(s): source_only" in outcome.output
    assert "pft vs source_only:" in outcome.output
    assert "benchmark: 1 run(s), 1 reused" in outcome.output


def test_busy_folder_is_refused(world: tuple[BenchmarkResult, Path], tmp_path: Path) -> None:
    _, cache = world
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(BenchmarkError, match="another `pft benchmark` is writing"):
            run_benchmark(CONFIG, out, cache)
        outcome = CliRunner().invoke(app, _cli_args(tmp_path, out, cache))
    assert outcome.exit_code == 1
    assert "error: another `pft benchmark` is writing" in outcome.output
    assert not (out / "runs").exists()


def test_cli_rejects_bad_seeds_and_profiles(tmp_path: Path) -> None:
    runner = CliRunner()
    bad_seed = runner.invoke(app, ["benchmark", "--seeds", "a,b", "--out", str(tmp_path), "--no-progress"])
    assert bad_seed.exit_code == 2 and "--seeds" in bad_seed.output
    bad_profile = runner.invoke(
        app, ["benchmark", "--profiles", "nope", "--out", str(tmp_path), "--no-progress"]
    )
    assert bad_profile.exit_code == 2 and "invalid configuration" in bad_profile.output


# --- no source-free method sees the oracle clips or adapts on the eval clips ----------------------------
class _Forbidden:
    """Stands in for a target's `oracle` frames or crops: any use at all fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a source-free method read the oracle split (.{name})")

    def __len__(self) -> int:
        raise AssertionError("a source-free method read the oracle split (len)")


def _rows(rows: torch.Tensor | np.ndarray) -> set[bytes]:
    return {np.asarray(row).tobytes() for row in rows}


def _guarded(name: str, runner: Runner, seen: list[tuple[str, str]]) -> Runner:
    """``runner`` with its inputs checked: the adapt frames (features and crops) share no row with
    the eval or oracle frames and are all neutral; a source-free method gets tripwires for the
    oracle frames and crops; and its predictions on the first half of the eval frames are the same
    whether or not the second half exists (a method that adapted on the eval frames would change
    them)."""

    def run(model: Any, target: TargetData, settings: Any, seed: int) -> MethodOutcome:
        adapt = _rows(target.adapt.features)
        assert not adapt & _rows(target.eval.features), "adapt frames among the eval frames"
        if target.oracle is not None:
            assert not adapt & _rows(target.oracle.features), "adapt frames among the oracle frames"
        assert bool((target.adapt.labels == 0).all()), "non-neutral adapt frames"
        images = target.images
        if images is not None:
            crops = _rows(images.adapt)
            assert not crops & _rows(images.eval), "adapt crops among the eval crops"
            if images.oracle is not None:
                assert not crops & _rows(images.oracle), "adapt crops among the oracle crops"
        given = target
        if method_spec(name).source_free:  # only the upper bounds (oracle, oracle_bias) see labels
            if images is not None:
                images = dataclasses.replace(images, oracle=_Forbidden())  # type: ignore[arg-type]
            given = dataclasses.replace(target, oracle=_Forbidden(), images=images)  # type: ignore[arg-type]
        full = runner(model, given, settings, seed)
        half = len(target.eval) // 2
        first = torch.zeros(len(target.eval), dtype=torch.bool)
        first[:half] = True
        shorter = dataclasses.replace(
            given,
            eval=target.eval.select(first),
            images=None if images is None else dataclasses.replace(images, eval=images.eval[:half]),
        )
        part = runner(model, shorter, settings, seed)
        assert torch.allclose(part.logits, full.logits[:half], rtol=1e-5, atol=1e-5), (
            f"{name} used eval frames"
        )
        seen.append((name, target.subject))
        return full

    return run


def test_no_source_free_method_sees_oracle_or_adapts_on_eval(
    world: tuple[BenchmarkResult, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cache = world
    seen: list[tuple[str, str]] = []
    for name, runner in list(METHODS.items()):
        monkeypatch.setitem(METHODS, name, _guarded(name, runner, seen))
    experiment = CONFIG.run_config("biovid", SEED).model_copy(update={"methods": tuple(METHODS)})
    run_experiment(ExperimentConfig.model_validate(experiment.model_dump()), tmp_path / "run", cache)
    assert sorted(seen) == sorted((m, s) for m in METHODS for s in ("S005", "S006"))


def test_the_eval_guard_catches_a_transductive_method(
    world: tuple[BenchmarkResult, Path], tmp_path: Path
) -> None:
    _, cache = world

    def leaky(model: Any, target: TargetData, settings: Any, seed: int) -> MethodOutcome:
        centred = target.eval.features - target.eval.features.mean(0) + target.adapt.features.mean(0)
        return MethodOutcome(model.classifier(centred).detach(), 0, 0.0)

    def peeking(model: Any, target: TargetData, settings: Any, seed: int) -> MethodOutcome:
        assert target.oracle is not None
        _ = len(target.oracle)
        return METHODS["source_only"](model, target, settings, seed)

    experiment = CONFIG.run_config("biovid", SEED)
    for bad, message in ((leaky, "used eval frames"), (peeking, "read the oracle split")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(METHODS, "pft", _guarded("pft", bad, []))
            with pytest.raises(AssertionError, match=message):
                run_experiment(experiment, tmp_path / "run", cache)


def test_run_config_sets_profile_and_seed_and_resolves() -> None:
    config = CONFIG.run_config("biovid", SEED)
    assert (config.profile, config.seed, config.cohort.seed, config.source_train.seed) == (
        "biovid",
        SEED,
        SEED,
        SEED,
    )
    assert config.methods == tuple(METHOD_LIST)
    assert bench.run_name("stressid", 101) == "stressid-seed101"
    both = BenchmarkConfig.model_validate({"profiles": ["bah", "biovid"], "seeds": [101, 0, 100, 2]})
    assert both.grid() == [(p, s) for p in ("bah", "biovid") for s in (0, 2, 100, 101)]


def test_stage1_epochs_come_from_the_profile_unless_the_experiment_sets_them() -> None:
    """bah's source model trains 20 epochs, the other profiles 12 (ProfileSpec.source_epochs); a
    number in ``source_train.epochs`` wins, and it survives the JSON round trip of config.json."""
    default = BenchmarkConfig.model_validate({"profiles": ["biovid", "bah"], "seeds": [0]})
    assert default.run_config("biovid", 0).source_train.epochs == 12
    assert default.run_config("bah", 0).source_train.epochs == 20
    assert default.run_config("affwild2", 0).source_train.epochs == 12
    pinned = BenchmarkConfig.model_validate(
        {"profiles": ["bah"], "seeds": [0], "experiment": {"source_train": {"epochs": 5}}}
    )
    assert pinned.run_config("bah", 0).source_train.epochs == 5
    dumped = ExperimentConfig(profile="bah").model_dump(mode="json")
    assert dumped["source_train"]["epochs"] is None  # unresolved: still "the profile's"
    assert ExperimentConfig.model_validate(dumped).resolved().source_train.epochs == 20
