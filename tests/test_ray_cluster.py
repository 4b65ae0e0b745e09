"""Ray as the distributed engine, on a real two-node cluster on 127.0.0.1 (two ``ray start``
raylets): ``pft simulate --engine batched --ray-address`` gives the in-process numbers, a chunk
whose worker dies is retried and counted once, and the cluster is stopped whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from pft.cli.main import app
from pft.core.adaptation import AdaptConfig
from pft.core.cohort import CohortConfig, make_cohort
from pft.core.errors import ResourceError
from pft.core.frames import FrameSet
from pft.core.methods import MethodSettings, TargetData
from pft.core.personalize import PersonalizeConfig
from pft.simulations.batched import BatchedConfig, run_pft_batched
from pft.simulations.bench_engines import bench_engines
from pft.simulations.cluster import LocalCluster, PieceReport, check_ray_address, ray_session, run_tasks
from pft.simulations.experiment import ExperimentConfig, run_experiment
from pft.simulations.synthetic_world import synthetic_model, synthetic_subject

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "profile": "biovid",
    "seed": 3,
    "source_subjects": 3,
    "target_subjects": 3,
    "methods": ["source_only", "pft"],
    "engine": "batched",
    "batched": {"chunk_size": 1},  # three chunks: both nodes get work
    "embedding_plot": False,
    "cohort": {"light": True},
    "model": {"width": 8, "translator_hidden": 32},
    "source_train": {"epochs": 8},
    "pretrain": {"iterations": 40},
    "settings": {"pft": {"adapt": {"max_iterations": 30, "min_iterations": 8}}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    """The in-process run (it fills the cache) while the two-node cluster starts beside it."""
    root = tmp_path_factory.mktemp("ray-cluster")
    cluster = LocalCluster(nodes=2, cpus=1, timeout_s=90)
    failure: list[BaseException] = []

    def start() -> None:
        try:
            cluster.start()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        run_experiment(ExperimentConfig.model_validate(TINY), root / "in-process", root / "cache")
    finally:
        thread.join()
    try:
        if failure:
            raise failure[0]
        # one driver session for the tests run from here (its workers start once); the CLI run
        # of `pft simulate` is a driver of its own
        with ray_session(cluster.address):
            yield cluster, root
    finally:
        cluster.stop()


def _drivers() -> list[Any]:
    """The driver jobs the cluster's GCS has seen (this session is connected to it)."""
    from ray._private.state import jobs

    return list(jobs())


def _numbers(run: Path) -> dict[str, Any]:
    r = json.loads((run / "results.json").read_text())
    return {
        "per_subject": {m: v["per_subject"] for m, v in r["methods"].items()},
        "iterations": r["methods"]["pft"]["adapt_iterations"],
        "confusion": r["confusion"],
    }


def _simulate_on(
    cluster: LocalCluster, root: Path, engine: str, out: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``pft simulate --engine ENGINE --ray-address CLUSTER`` on the tiny cohort (seed 3), in a real
    subprocess whose environment names no other Ray cluster."""
    config = root / f"tiny-{engine}.json"
    drop = ("seed", "engine") if engine == "batched" else ("seed", "engine", "batched")
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k not in drop}))
    cmd = [
        str(Path(sys.executable).parent / "pft"), "simulate", "--engine", engine, "--seed", "3",
        "--config", str(config), "--cache-dir", str(root / "cache"), "--out", str(out),
        "--ray-address", cluster.address, "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_simulate_on_two_nodes_equals_the_in_process_run(world: tuple[LocalCluster, Path]) -> None:
    cluster, root = world
    out = _simulate_on(cluster, root, "batched", root / "ray", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _numbers(root / "ray") == _numbers(root / "in-process")
    chunks = [line for line in out.stderr.splitlines() if line.startswith("chunk ")]
    assert len(chunks) == 3, out.stderr  # one report per chunk, across the cluster
    assert "DEPRECAT" not in out.stdout + out.stderr and "FutureWarning" not in out.stderr


def test_flower_engine_on_the_cluster_equals_the_in_process_run(world: tuple[LocalCluster, Path]) -> None:
    """``pft simulate --engine flower --ray-address``: the virtual nodes are Ray actors on the
    two-node cluster (through ``flwr run`` and a SuperLink of the run's own); same per-subject numbers."""
    cluster, root = world
    drivers = _drivers()
    out = _simulate_on(cluster, root, "flower", root / "flower", timeout=480)
    assert out.returncode == 0, out.stdout + out.stderr
    flower = json.loads((root / "flower" / "results.json").read_text())
    assert flower["engine"] == "flower" and flower["federation"]["completed"] == 3
    want = _numbers(root / "in-process")["per_subject"]
    assert {m: v["per_subject"] for m, v in flower["methods"].items()} == want
    # the simulation's Ray driver joined this cluster (one more job in its GCS), on no Ray of its own
    assert len(_drivers()) == len(drivers) + 1
    assert "DEPRECAT" not in out.stdout + out.stderr and " DEBUG " not in out.stdout + out.stderr


def test_bench_engines_flower_runs_its_nodes_on_the_cluster(world: tuple[LocalCluster, Path]) -> None:
    """``pft bench engines --engines flower --ray-address``: `flwr run` whose simulation joins the
    cluster (one more driver in its GCS) and does the same fixed work."""
    cluster, _ = world
    drivers = _drivers()
    data = bench_engines(
        2, engines=("flower",), iterations=2, ray_address=cluster.address, log=lambda _m: None
    )
    row = data["engines"]["flower"]
    assert "error" not in row, row
    assert row["iterations"] == 2 * 2 and row["wall_s"] > 0
    assert len(_drivers()) == len(drivers) + 1


def test_run_pft_batched_on_the_cluster_is_bit_identical(world: tuple[LocalCluster, Path]) -> None:
    """Adapted logits of every subject, chunk by chunk on two nodes vs in this process."""
    cluster, _ = world
    model = synthetic_model(2)
    stop = AdaptConfig(lr=0.01, max_iterations=36, min_iterations=8, tol=0.01, window=3)
    settings = MethodSettings(pft=PersonalizeConfig(adapt=stop))
    targets = []
    for k in range(5):
        s, e = synthetic_subject(k, 2, frames=20 + k), synthetic_subject(k + 50, 2, frames=12)
        labels = torch.zeros(len(s.features), dtype=torch.long)
        adapt = FrameSet(s.features, s.frame_stats, labels, s.video_ids, s.time_index, None)
        held = FrameSet(e.features, e.frame_stats, labels[:12], e.video_ids, e.time_index, None)
        targets.append((k, TargetData(f"t{k}", adapt, None, held)))
    engine = BatchedConfig(chunk_size=2)
    here = run_pft_batched(model, targets, settings, 4, engine)
    nodes: set[str] = set()
    there = run_pft_batched(
        model, targets, settings, 4, engine, ray_address=cluster.address,
        progress=lambda d, t, r: nodes.add(r.node),
    )  # fmt: skip
    assert list(there) == list(here)
    assert len(nodes) == 2  # three chunks of one CPU each on two one-CPU nodes: both ran some
    assert len({o.iterations for o in here.values()}) > 1  # subjects stop at different steps
    for name, mine in here.items():
        assert there[name].iterations == mine.iterations and there[name].converged == mine.converged
        assert torch.equal(there[name].logits, mine.logits), name


def test_cohort_make_on_the_cluster_is_the_in_process_cohort(
    world: tuple[LocalCluster, Path], tmp_path: Path
) -> None:
    """Subjects rendered on the workers, files written here: same manifest and files, byte for byte."""
    cluster, _ = world
    config = CohortConfig(
        profile="biovid", seed=5, source_subjects=2, target_subjects=1, light=True, workers=1
    )
    make_cohort(config, tmp_path / "here")
    args = [
        "cohort",
        "make",
        "--out",
        str(tmp_path / "ray"),
        "--source-subjects",
        "2",
        "--target-subjects",
        "1",
    ]
    done = CliRunner().invoke(
        app, [*args, "--seed", "5", "--light", "--workers", "1", "--ray-address", cluster.address]
    )
    assert done.exit_code == 0, done.output

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    here, there = tree(tmp_path / "here"), tree(tmp_path / "ray")
    assert len(here) > 3 and "manifest.json" in here
    assert here == there


def test_a_chunk_whose_worker_dies_is_retried_and_counted_once(
    world: tuple[LocalCluster, Path], tmp_path: Path
) -> None:
    cluster, _ = world
    runs = tmp_path / "runs.log"
    crashed = tmp_path / "crashed"

    def square(k: int) -> int:  # pickled by value: the workers need not import this test
        with open(runs, "a") as f:
            f.write(f"{k}\n")
        if k == 2 and not crashed.exists():
            crashed.touch()
            os._exit(1)  # the worker process dies mid-task, as on a lost node
        return k * k

    reports: list[PieceReport] = []
    with ray_session(cluster.address):
        out = run_tasks(square, [(k,) for k in range(5)], total=5, progress=lambda d, t, r: reports.append(r))
    assert out == [0, 1, 4, 9, 16]
    assert sorted(int(x) for x in runs.read_text().split()) == [0, 1, 2, 2, 3, 4]  # chunk 2 ran twice
    assert sorted(r.index for r in reports) == [0, 1, 2, 3, 4]  # ... and was counted once


def test_an_error_in_the_work_itself_is_raised_not_retried(world: tuple[LocalCluster, Path]) -> None:
    cluster, _ = world

    def refuse(k: int) -> int:
        raise ValueError(f"bad piece {k}")

    with ray_session(cluster.address), pytest.raises(ValueError, match="bad piece"):
        run_tasks(refuse, [(0,)], retries=3)


def test_bad_addresses_are_refused_before_any_work() -> None:
    for bad in ("", "localhost", "http://x:1", "a:b", "host:port:1"):
        with pytest.raises(ResourceError, match="--ray-address"):
            check_ray_address(bad)
    assert check_ray_address("auto") == "auto"
    assert check_ray_address("10.0.0.5:6379") == "10.0.0.5:6379"


def test_the_commands_refuse_ray_address_where_it_does_not_apply(tmp_path: Path) -> None:
    """Checked before any work: a malformed address, or an engine whose work does not go to Ray."""
    cases = [
        (["simulate", "--engine", "loop", "--ray-address", "127.0.0.1:1"], "--engine batched or flower"),
        (["simulate", "--engine", "flower", "--ray-address", "nowhere"], "--ray-address"),
        (["simulate", "--engine", "batched", "--ray-address", "nowhere"], "--ray-address"),
        (["bench", "engines", "--engines", "loop", "--ray-address", "127.0.0.1:1"], "batched,batched_fast"),
        (["benchmark", "--engine", "loop", "--ray-address", "127.0.0.1:1"], "--engine batched"),
        (["cohort", "make", "--out", str(tmp_path / "c"), "--ray-address", "x"], "--ray-address"),
    ]
    for args, says in cases:
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 2, (args, done.output)
        assert says in " ".join(done.output.split()), (args, done.output)
    assert not (tmp_path / "c").exists()
