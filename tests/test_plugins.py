"""A method, a cohort profile and a dataset layout from outside the package (docs/extending.md).

``tests/plugins/pft_example_plugin`` is a separate distribution: pip installs it into a temporary
folder, whose ``*.dist-info/entry_points.txt`` importlib.metadata reads when that folder is on the
path; ``pft benchmark`` then runs its method on its profile, and ``pft simulate`` on a folder in its
layout, in their own processes, with no edit to the package. The entry points and the public calls
(``register_method``, ``register_profile``, ``register_layout``) are also checked in-process, each
registration undone after its test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from pft.cli.main import app
from pft.core import plugins
from pft.core.cohort import PROFILES, CohortConfig, ProfileSpec, make_cohort, profile_names, register_profile
from pft.core.cohort.generate import worker_payload
from pft.core.data import DatasetIndex, VideoRecord, layout_names, load_dataset, register_layout
from pft.core.data.datasets import LOADERS
from pft.core.errors import DatasetLayoutError
from pft.core.frames import FrameSet
from pft.core.methods import _SPECS as METHOD_SPECS
from pft.core.methods import (
    METHODS,
    MethodOutcome,
    MethodSettings,
    MethodSpec,
    TargetData,
    method_input,
    method_names,
    method_spec,
    register_method,
    run_source_only,
)
from pft.core.models import ModelConfig
from pft.core.plugins import PluginError, reload_entry_points
from pft.core.results import markdown_table, ordered_methods
from pft.simulations.experiment import ExperimentConfig
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject

PLUGIN_SOURCE = Path(__file__).parent / "plugins" / "pft_example_plugin"
FIELDS: dict[str, Any] = {
    "embedding_plot": False,
    "cohort": {"frame_size": 64, "frames_per_clip": 8, "light": True},
    "model": {"width": 8, "translator_hidden": 32, "image_size": 32},
    "source_train": {"epochs": 3},
    "pretrain": {"iterations": 10},
    "settings": {
        "pft": {"adapt": {"max_iterations": 10, "min_iterations": 10}},
        "neutral_bias": {"smoothing": 0.3, "adapt": {"max_iterations": 12, "min_iterations": 12}},
    },
}
METHOD_LIST = "source_only,pft,neutral_bias"
PIP_INSTALL = [
    sys.executable,
    "-m",
    "pip",
    "install",
    "-q",
    "--no-deps",
    "--no-build-isolation",
    "--no-index",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plug-in, pip-installed (its own pyproject, no edit of ours) into a temporary folder."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "source"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    done = subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "pft_example_plugin-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


def _pft(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pft.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    fields = root / "fields.yaml"
    fields.write_text(yaml.safe_dump(FIELDS))
    return root, fields


@pytest.fixture(scope="module")
def benchmarked(installed: Path, workspace: tuple[Path, Path]) -> subprocess.CompletedProcess[str]:
    """`pft benchmark` of the plug-in's method on the plug-in's profile, in its own process."""
    root, fields = workspace
    return _pft(
        installed,
        "benchmark",
        "--profiles",
        "biovid_subtle",
        "--seeds",
        "3",
        "--methods",
        METHOD_LIST,
        "--source-subjects",
        "3",
        "--target-subjects",
        "2",
        "--config",
        str(fields),
        "--cache-dir",
        str(root / "cache"),
        "--out",
        str(root / "benchmark"),
        "--no-progress",
        cwd=root,
    )


@pytest.mark.slow
def test_benchmark_runs_the_plugin_method_on_the_plugin_profile(
    benchmarked: subprocess.CompletedProcess[str], workspace: tuple[Path, Path]
) -> None:
    root, _ = workspace
    assert benchmarked.returncode == 0, benchmarked.stdout[-2000:] + benchmarked.stderr[-3000:]
    assert "neutral_bias vs source_only:" in benchmarked.stdout
    out = root / "benchmark"
    (group,) = json.loads((out / "benchmark.json").read_text())["groups"]
    assert group["profile"] == "biovid_subtle"
    assert list(group["methods"]) == ["source_only", "neutral_bias", "pft"]  # in its table group
    assert "`neutral_bias`" in (out / "report.md").read_text()
    run = out / "runs" / "biovid_subtle-seed3"
    results = json.loads((run / "results.json").read_text())
    assert results["profile"] == "biovid_subtle"
    entry = results["methods"]["neutral_bias"]
    assert sorted(entry["per_subject"]) == ["S004", "S005"]
    assert entry["adapt_iterations"] == 12  # its own settings, from the config file, were used
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["neutral_bias"]["smoothing"] == 0.3
    assert config["cohort"]["profile"] == "biovid_subtle"
    # the run's own report lists it beside the built-in rows, in the group it registered
    assert "| Simple baselines | `neutral_bias` |" in (run / "report.md").read_text()


@pytest.mark.slow
def test_simulate_reads_a_folder_in_the_plugin_layout(
    benchmarked: subprocess.CompletedProcess[str], installed: Path, workspace: tuple[Path, Path]
) -> None:
    root, fields = workspace
    assert benchmarked.returncode == 0
    (manifest,) = (root / "cache" / "cohorts").glob("biovid_subtle-*/manifest.json")
    index = load_dataset(manifest.parent, "synthetic")
    flat = root / "flat"
    flat.mkdir()
    for k, record in enumerate(index.records):  # <subject>__<class>__<n>.mp4, with the true faces
        name = f"{record.subject}__{record.label}__{k:03d}"
        shutil.copyfile(record.path, flat / f"{name}.mp4")
        shutil.copyfile(record.path.with_name(record.path.stem + ".faces.json"), flat / f"{name}.faces.json")
    out = root / "flat-run"
    done = _pft(
        installed,
        "simulate",
        "--data",
        str(flat),
        "--layout",
        "flat",
        "--detector",
        "annotated",
        "--methods",
        "source_only,neutral_bias",
        "--config",
        str(fields),
        "--cache-dir",
        str(root / "cache"),
        "--out",
        str(out),
        "--no-progress",
        cwd=root,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {"root": str(flat), "layout": "flat"}
    assert results["classes"] == ["neutral", "pain"]
    assert results["methods"]["neutral_bias"]["per_subject"]
    assert (out / "report.md").read_text().startswith("# SFDA-PFT on the `flat` dataset")


def test_entry_points_are_read_in_process_and_settings_validated(
    installed: Path, clean_registries: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed distribution's entry points, read by this process when the CLI validates;
    a wrong setting of the plug-in's method is refused by its own model (exit 2)."""
    monkeypatch.syspath_prepend(str(installed))
    reload_entry_points()
    assert "biovid_subtle" not in PROFILES and "flat" not in LOADERS  # not read before asked
    assert method_names()[-1] == "neutral_bias"
    assert profile_names()[-1] == "biovid_subtle" and layout_names()[-1] == "flat"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"settings": {"neutral_bias": {"smoothing": 2.0}}}))
    runner = CliRunner()
    refused = runner.invoke(
        app, ["simulate", "--methods", "neutral_bias", "--config", str(bad), "--out", str(tmp_path)]
    )
    assert refused.exit_code == 2 and "smoothing" in refused.output
    unknown = runner.invoke(app, ["simulate", "--methods", "no_such_method", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "no_such_method" in unknown.output


# --- the public calls, in-process ---------------------------------------------------------------
class ShiftConfig(BaseModel):
    shift: float = 1.0


def run_shift(model: Any, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """Source-only with the neutral logit raised by ``shift`` (what it was given is recorded)."""
    config = settings.method_config("shift_test", ShiftConfig)
    logits = model.classifier(target.eval.features).detach()
    logits[:, 0] += config.shift
    return MethodOutcome(logits, 0, 0.0)


@pytest.fixture
def clean_registries() -> Iterator[None]:
    """Whatever a test registers is gone after it (the other tests see the built-ins only)."""
    methods, specs, profiles, loaders = dict(METHODS), dict(METHOD_SPECS), dict(PROFILES), dict(LOADERS)
    loaded = set(plugins._loaded)
    yield
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (METHODS, methods),
        (METHOD_SPECS, specs),
        (PROFILES, profiles),
        (LOADERS, loaders),
    ]
    for registry, before in saved:
        registry.clear()
        registry.update(before)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)


def _frames(n: int, label: int) -> FrameSet:
    return FrameSet(
        torch.randn(n, 4),
        torch.randn(n, 2),
        torch.full((n,), label),
        torch.zeros(n, dtype=torch.long),
        torch.arange(n),
        None,
    )


def test_register_method_makes_its_settings_part_of_the_config(clean_registries: None) -> None:
    with pytest.raises(ValidationError, match="unknown method"):
        ExperimentConfig(methods=("source_only", "shift_test"))
    register_method("shift_test", run_shift, ShiftConfig, group="Simple baselines")
    assert "shift_test" in method_names()
    config = ExperimentConfig.model_validate(
        {"methods": ["source_only", "shift_test"], "settings": {"shift_test": {"shift": 2.5}}}
    )
    assert config.settings.method_config("shift_test", ShiftConfig).shift == 2.5
    resolved = ExperimentConfig(methods=("shift_test",)).resolved()  # defaults recorded
    assert resolved.model_dump(mode="json")["settings"]["shift_test"] == {"shift": 1.0}
    again = ExperimentConfig.model_validate_json(config.model_dump_json())  # through JSON (Flower)
    assert again == config and again.config_hash() == config.config_hash()
    with pytest.raises(ValidationError, match="shift"):
        MethodSettings.model_validate({"shift_test": {"shift": "a lot"}})
    with pytest.raises(ValidationError, match="unknown setting 'typo'"):
        MethodSettings.model_validate({"typo": {}})
    rows = ordered_methods(["oracle", "shift_test", "pft", "source_only"])
    assert rows == [
        ("Source-only", "source_only"),
        ("Simple baselines", "shift_test"),
        ("SFDA-PFT (ours)", "pft"),
        ("Oracle", "oracle"),
    ]


def test_register_method_refuses_taken_and_bad_names(clean_registries: None) -> None:
    for name in ("pft", "seed", "adabn_batch_size", "Bad-Name", "1x"):
        with pytest.raises(PluginError):
            register_method(name, run_shift)
    register_method("shift_test", run_shift, ShiftConfig)
    register_method("shift_test", run_shift, ShiftConfig)  # the same again: nothing happens
    with pytest.raises(PluginError, match="already registered"):
        register_method("shift_test", run_source_only)
    register_method("shift_test", run_source_only, replace=True)
    assert METHODS["shift_test"] is run_source_only
    with pytest.raises(PluginError, match="pydantic"):
        register_method("other_test", run_shift, dict)  # type: ignore[arg-type]


def test_only_a_method_that_is_not_source_free_sees_the_oracle_frames(clean_registries: None) -> None:
    register_method("free_test", run_shift)
    register_method("labelled_test", MethodSpec(run_shift, source_free=False))
    target = TargetData("S1", _frames(6, 0), _frames(4, 1), _frames(5, 1))
    assert method_input("free_test", target).oracle is None
    assert method_input("free_test", target).adapt is target.adapt
    assert method_input("labelled_test", target).oracle is target.oracle
    assert method_input("oracle", target).oracle is target.oracle
    assert method_input("pft", target).oracle is None
    results = {
        "methods": {
            m: {"mean_f1": 50.0 + k, "per_subject": {"S1": {"f1": 50.0 + k}}}
            for k, m in enumerate(["source_only", "labelled_test"])
        }
    }
    assert "**" not in markdown_table(results).split("labelled_test")[1].splitlines()[0]  # never bold


def test_register_profile_and_its_cache_key(clean_registries: None, tmp_path: Path) -> None:
    variant = PROFILES["biovid"].model_copy(update={"name": "biovid_test", "resting_lean_fraction": 0.9})
    with pytest.raises(ValidationError, match="unknown cohort profile"):
        CohortConfig(profile="biovid_test")
    register_profile(variant)
    config = CohortConfig(profile="biovid_test", source_subjects=2, target_subjects=1)
    assert config.n_source == 2 and config.spec.resting_lean_fraction == 0.9
    before = config.config_hash()
    register_profile(variant.model_copy(update={"resting_lean_fraction": 0.1}), replace=True)
    assert config.config_hash() != before  # a changed knob is a new cohort, never a stale cache
    with pytest.raises(PluginError, match="taken"):
        register_profile(PROFILES["biovid"])
    with pytest.raises(ValidationError, match="no expression spec"):
        ProfileSpec.model_validate({**PROFILES["biovid"].model_dump(), "classes": ["neutral", "joy"]})
    assert ExperimentConfig(profile="biovid_test").resolved().cohort.profile == "biovid_test"


def test_a_registered_profile_renders_on_worker_processes(clean_registries: None, tmp_path: Path) -> None:
    """A profile registered in this process reaches the spawned render workers (which start with the
    built-in profiles only) with its spec; on the old code every worker failed with "unknown cohort
    profile". The cohort is the one a single process renders."""
    variant = PROFILES["bah"].model_copy(update={"name": "bah_workers_test", "target_subjects": 1})
    register_profile(variant)
    small = dict(profile="bah_workers_test", source_subjects=1, frame_size=64, frames_per_clip=4, light=True)
    two = make_cohort(CohortConfig(**small, workers=2), tmp_path / "two")
    one = make_cohort(CohortConfig(**small, workers=1), tmp_path / "one")
    assert two.model_dump()["videos"] == one.model_dump()["videos"] and len(two.videos) > 0
    payload = worker_payload(CohortConfig(**small))
    assert payload["profile_spec"]["name"] == "bah_workers_test"
    assert "profile_spec" not in worker_payload(CohortConfig(profile="bah"))


def test_register_layout_reads_a_folder(clean_registries: None, tmp_path: Path) -> None:
    (tmp_path / "a.mp4").write_bytes(b"")

    def one_folder(root: Path, label: str = "neutral") -> DatasetIndex:
        records = tuple(VideoRecord(path=p, subject="S1", label=label) for p in sorted(root.glob("*.mp4")))
        return DatasetIndex(layout="one_folder", root=root, classes=("neutral", "pain"), records=records)

    with pytest.raises(DatasetLayoutError, match="unknown layout"):
        load_dataset(tmp_path, "one_folder")
    register_layout("one_folder", one_folder)
    index = load_dataset(tmp_path, "one_folder", label="pain")
    assert [r.label for r in index.records] == ["pain"]
    with pytest.raises(DatasetLayoutError, match="bad loader option"):
        load_dataset(tmp_path, "one_folder", colour="red")
    register_layout("not_an_index", lambda root: {"records": []})  # type: ignore[arg-type,return-value]
    with pytest.raises(DatasetLayoutError, match="not a DatasetIndex"):
        load_dataset(tmp_path, "not_an_index")
    with pytest.raises(PluginError, match="taken"):
        register_layout("generic", one_folder)


def test_a_broken_entry_point_stops_with_its_name(
    clean_registries: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pft.methods]\nbroken = no_such_module_anywhere:runner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reload_entry_points(plugins.METHODS_GROUP)
    with pytest.raises(PluginError, match=r"broken = no_such_module_anywhere:runner .*broken-plugin 1\.0"):
        method_names()
    with pytest.raises(PluginError):  # read again on the next call, not skipped
        method_names()
    # a run of built-in names never imports the plug-ins, so it is not stopped by a broken one
    config = ExperimentConfig(methods=("source_only", "pft"), settings=MethodSettings(seed=1))
    assert config.resolved().cohort.profile == "biovid"
    with pytest.raises(PluginError, match="no_such_module_anywhere"):  # one that names another
        ExperimentConfig(methods=("source_only", "broken"))


def test_the_example_method_keeps_the_protocol(
    installed: Path, clean_registries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plug-in's runner on a seeded synthetic source model: it trains (its own settings), is
    seeded, leaves the shipped model as it was, and predicts each eval frame on its own (the first
    half's logits do not depend on the second half)."""
    monkeypatch.syspath_prepend(str(installed))
    reload_entry_points()
    spec = method_spec("neutral_bias")
    config = ModelConfig(width=8, translator_hidden=32)
    model = synthetic_model(0, config)
    adapt, held = synthetic_subject(0, 0, config), synthetic_subject(1, 0, config, frames=40)

    def frames(s: Any, label: int) -> FrameSet:
        n = len(s.features)
        return FrameSet(s.features, s.frame_stats, torch.full((n,), label), s.video_ids, s.time_index, None)

    target = TargetData("S1", frames(adapt, 0), None, frames(held, 1))
    settings = MethodSettings.model_validate({"neutral_bias": {"adapt": {"max_iterations": 9}}})
    shipped = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    outcome = spec.runner(model, target, settings, 7)
    assert outcome.iterations == 9 and outcome.logits.shape == (40, config.num_classes)
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in shipped.items())
    source = run_source_only(model, target, settings, 7).logits
    assert not torch.allclose(outcome.logits, source)  # it adapted C's bias
    assert torch.equal(spec.runner(model, target, settings, 7).logits, outcome.logits)  # seeded
    first = torch.arange(40) < 20
    shorter = dataclasses.replace(target, eval=target.eval.select(first))
    assert torch.allclose(spec.runner(model, shorter, settings, 7).logits, outcome.logits[:20])
