"""``pft benchmark``: the experiment over profiles x seeds x methods, resumable, with statistics.

Each (profile, seed) is one ``pft simulate`` run (``run_experiment``, or the Flower engine), with
every cache shared. Runs are written under ``OUT/runs/<profile>-seed<seed>/``:

- a run is built in ``OUT/runs/.partial/<profile>-seed<seed>/`` and moved into place (one
  ``rename``) only after it finished and its ``complete.json`` marker was written, so a folder
  under ``OUT/runs/`` is always a whole run and a half-written one is never read as finished;
- on a new call a finished run whose resolved config equals the requested one is reused
  (skipped); a ``.partial`` folder (an interrupted run) is deleted and the run restarts from its
  first stage (the caches it had already filled, each written atomically, are reused); a finished
  run of another config (e.g. other methods) is run again and replaces it;
- a lock (``OUT/.lock``) keeps a second ``pft benchmark`` from writing the same folder.

Then the runs are analysed per (profile, seed role) (:mod:`pft.simulations.analysis`; the roles of
:mod:`pft.simulations.protocol` are never averaged together) and ``benchmark.json``,
``report.md`` and the plots are written (:mod:`pft.simulations.benchmark_report`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pft.core.atomic import atomic_write_text
from pft.core.cohort import profile_names
from pft.core.config import FrozenConfig
from pft.core.errors import PFTError
from pft.simulations.analysis import StatsConfig, analyse_runs
from pft.simulations.checks import Finding
from pft.simulations.experiment import PROFILES, ExperimentConfig, Profile, ProgressFactory, run_experiment
from pft.simulations.protocol import VALIDATION_SEED_MIN, seed_role, split_by_role

RunStatus = Literal["ran", "reused", "restarted", "replaced"]


class BenchmarkError(PFTError):
    """The benchmark cannot start or go on (e.g. its output folder is in use)."""


class BenchmarkConfig(FrozenConfig):
    """What ``pft benchmark`` runs: profiles x seeds of one experiment config, and the statistics.

    ``experiment`` is the config of every run; its ``profile`` and ``seed`` are replaced by each
    (profile, seed) of the grid. The resolved config is written as ``benchmark-config.json``.
    """

    profiles: tuple[Profile, ...] = PROFILES
    seeds: tuple[int, ...] = (0, 1, 2)
    experiment: ExperimentConfig = ExperimentConfig(methods=("source_only", "pft", "oracle"))
    stats: StatsConfig = StatsConfig()
    num_cpus: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, value: tuple[Profile, ...]) -> tuple[Profile, ...]:
        if not value:
            raise ValueError("at least one profile is needed")
        known = PROFILES if all(p in PROFILES for p in value) else profile_names()  # registered too
        unknown = [p for p in value if p not in known]
        if unknown:
            raise ValueError(f"unknown cohort profile(s) {unknown}; choose from {sorted(known)}")
        return tuple(dict.fromkeys(value))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("at least one seed is needed")
        if any(s < 0 for s in value):
            raise ValueError(f"seeds are >= 0, got {list(value)}")
        return tuple(dict.fromkeys(value))

    def run_config(self, profile: Profile, seed: int) -> ExperimentConfig:
        """The resolved experiment config of one (profile, seed) of the grid."""
        data = self.experiment.model_dump(mode="json")
        data.update(profile=profile, seed=seed)
        return ExperimentConfig.model_validate(data).resolved()

    def grid(self) -> list[tuple[Profile, int]]:
        """(profile, seed) pairs in run order: profile by profile, test seeds before validation seeds."""
        ordered = [s for seeds in split_by_role(self.seeds).values() for s in seeds]
        return [(p, s) for p in self.profiles for s in ordered]


@dataclass
class RunRecord:
    """One (profile, seed) of a benchmark: where it is, whether it ran now, and its results."""

    profile: str
    seed: int
    folder: Path
    status: RunStatus
    seconds: float
    results: dict[str, Any] = field(repr=False, default_factory=dict)

    def as_dict(self, root: Path) -> dict[str, Any]:
        """The record for benchmark.json (folder relative to the benchmark's folder)."""
        return {
            "profile": self.profile,
            "seed": self.seed,
            "role": seed_role(self.seed),
            "folder": str(self.folder.relative_to(root)),
            "status": self.status,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class BenchmarkResult:
    """What ``run_benchmark`` returns: the runs, the analyses, the warnings and the files."""

    benchmark: dict[str, Any]
    runs: list[RunRecord]
    out_dir: Path
    report: Path

    @property
    def findings(self) -> list[Finding]:
        """Every warning of every run."""
        return [Finding.from_dict(f) for f in self.benchmark["findings"]]


def run_name(profile: str, seed: int) -> str:
    """The folder name of one run: ``<profile>-seed<seed>``."""
    return f"{profile}-seed{seed}"


def _finished(folder: Path, wanted: ExperimentConfig) -> bool | None:
    """True: a finished run of ``wanted``; False: a finished run of another config; None: no run."""
    marker, config, results = folder / "complete.json", folder / "config.json", folder / "results.json"
    if not (marker.is_file() and config.is_file() and results.is_file()):
        return None
    try:
        stored = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return bool(stored == wanted.model_dump(mode="json"))


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BenchmarkError(
                f"another `pft benchmark` is writing {out_dir}; wait for it to finish or use another --out"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _publish(partial: Path, final: Path) -> None:
    """Move a finished run into place; an older run of that name is replaced, never merged."""
    trash = final.parent / ".partial" / f"{final.name}.old"
    if trash.exists():
        shutil.rmtree(trash)
    if final.exists():
        os.replace(final, trash)
    os.replace(partial, final)
    if trash.exists():
        shutil.rmtree(trash)


RunOne = Callable[[ExperimentConfig, Path, Path | None, ProgressFactory, Callable[[str], None]], object]


def _run_one(config: BenchmarkConfig, ray_address: str | None = None) -> RunOne:
    def run(
        experiment: ExperimentConfig,
        out_dir: Path,
        cache_root: Path | None,
        progress: ProgressFactory,
        log: Callable[[str], None],
    ) -> object:
        if experiment.engine == "flower":
            from pft.simulations.flower_engine import run_flower_simulation

            return run_flower_simulation(
                experiment, out_dir, cache_root, num_cpus=config.num_cpus, num_gpus=config.num_gpus, log=log
            )
        return run_experiment(
            experiment, out_dir, cache_root, progress=progress, log=log, ray_address=ray_address
        )

    return run


def _silent_stage(_desc: str, _total: int) -> Callable[[int, int], None]:
    return lambda _d, _t: None


def run_benchmark(
    config: BenchmarkConfig,
    out_dir: Path,
    cache_root: Path | None = None,
    progress: ProgressFactory = _silent_stage,
    on_run: Callable[[int, int, str], None] = lambda _d, _t, _l: None,
    log: Callable[[str], None] = lambda _m: None,
    *,
    ray_address: str | None = None,
) -> BenchmarkResult:
    """Run (or reuse) every (profile, seed) of ``config`` and write the benchmark's outputs.

    ``ray_address`` (``--ray-address``, batched engine): every run's batched chunks run as Ray
    tasks on that cluster (same numbers; not part of the config, so runs made with or without it
    are reused alike).

    Parameters
    ----------
    config:
        The grid, the experiment config of every run, the statistics.
    out_dir:
        The benchmark's folder: ``runs/``, ``benchmark.json``, ``report.md``, plots,
        ``benchmark-config.json``.
    cache_root:
        Cache root shared by every run (default ``$PFT_CACHE_DIR`` or ``~/.cache/pft``).
    progress:
        ``factory(stage, total) -> step(done, total)`` for the stages of the run in progress
        (descriptions are prefixed with the run's name).
    on_run:
        ``on_run(done, total, label)`` before each run (``done`` runs finished so far) and once
        at the end (``done == total``).
    log:
        Messages (reused, restarted, replaced runs; the checks' warnings are in the result).

    Returns
    -------
    BenchmarkResult
        The benchmark dict (as written to ``benchmark.json``), the runs, and the report's path.

    Raises
    ------
    BenchmarkError
        When another ``pft benchmark`` holds ``out_dir``.
    """
    from pft.simulations.benchmark_report import write_benchmark_outputs

    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    partial_root = runs_dir / ".partial"
    grid = config.grid()
    if ray_address is not None and config.experiment.engine != "batched":
        raise ValueError("ray_address runs the batched engine's chunks; use engine='batched'")
    run = _run_one(config, ray_address)
    records: list[RunRecord] = []
    with _locked(out_dir):
        config.write_json(out_dir / "benchmark-config.json")
        for done, (profile, seed) in enumerate(grid):
            name = run_name(profile, seed)
            on_run(done, len(grid), name)
            final, partial = runs_dir / name, partial_root / name
            wanted = config.run_config(profile, seed)
            state = _finished(final, wanted)
            if state is True:
                marker = json.loads((final / "complete.json").read_text())
                log(f"{name}: finished before, reused")
                records.append(
                    RunRecord(
                        profile,
                        seed,
                        final,
                        "reused",
                        float(marker.get("seconds", 0.0)),
                        json.loads((final / "results.json").read_text()),
                    )
                )
                continue
            status: RunStatus = "ran"
            if partial.exists():
                log(f"{name}: an interrupted run was left; restarting it")
                shutil.rmtree(partial)
                status = "restarted"
            elif state is False:
                log(f"{name}: the stored run has another config; running it again")
                status = "replaced"

            def stage(description: str, total: int, _name: str = name) -> Callable[[int, int], None]:
                return progress(f"{_name} {description}", total)

            t0 = time.perf_counter()
            run(wanted, partial, cache_root, stage, log)
            seconds = time.perf_counter() - t0
            results = json.loads((partial / "results.json").read_text())
            atomic_write_text(
                partial / "complete.json",
                json.dumps(
                    {
                        "profile": profile,
                        "seed": seed,
                        "seconds": round(seconds, 2),
                        "config": wanted.config_hash(),
                    },
                    indent=2,
                )
                + "\n",
            )
            _publish(partial, final)
            records.append(RunRecord(profile, seed, final, status, seconds, results))
        on_run(len(grid), len(grid), "done")
        benchmark = aggregate(config, records, out_dir)
        report = write_benchmark_outputs(out_dir, benchmark)
    return BenchmarkResult(benchmark, records, out_dir, report)


def aggregate(config: BenchmarkConfig, records: list[RunRecord], out_dir: Path) -> dict[str, Any]:
    """The benchmark dict: the runs, one analysis per (profile, seed role), every warning."""
    groups: list[dict[str, Any]] = []
    for profile in config.profiles:
        for seeds in split_by_role(config.seeds).values():
            runs = [r.results for r in records if r.profile == profile and r.seed in seeds]
            if runs:
                groups.append(analyse_runs(runs, config.stats))
    return {
        "config": config.model_dump(mode="json"),
        "protocol": {
            "validation_seed_min": VALIDATION_SEED_MIN,
            "roles": {str(s): seed_role(s) for s in config.seeds},
        },
        "runs": [r.as_dict(out_dir) for r in records],
        "groups": groups,
        "findings": [f for g in groups for f in g["findings"]],
        "seconds": round(sum(r.seconds for r in records if r.status != "reused"), 2),
    }
