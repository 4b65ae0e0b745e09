"""``pft simulate --engine flower``: the SFDA-PFT experiment as a Flower simulation.

One virtual node per target subject (node ``partition-id`` k = the k-th target in sorted order,
adapting with seed ``subject_seed(seed, k)``), the same cohort, cached features and stage-2 bundle as
the in-process engine - so the per-subject numbers are the same. The bundle is published as a
signed release; every virtual node verifies it, installs it in its own cache, adapts T on its
neutral videos, keeps T encrypted on its own disk, and sends back only allow-listed metrics.

The federation runs through Flower's current runtime (:mod:`pft.simulations.flower_runtime`):
``flwr run`` with a SuperLink of the run's own in simulation mode (own ``FLWR_HOME``, own port,
stopped after the run). The ServerApp and ClientApp are importable components
(``pft.server.app:app``, ``pft.client.flower_app:app``) that find their JSON spec through the run
config (``pft-spec``). The simulation's private keys (bundle signing, the nodes' store key) live in
the cache root (``keys/simulation``, mode 0700), never in the results folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from filelock import FileLock

from pft.client.flower_app import NodeSpec
from pft.client.store import generate_key_file
from pft.core.signing import load_signing_key, write_signing_key_pair
from pft.server.app import ServerSpec
from pft.server.publish import publish_bundle
from pft.simulations.experiment import ExperimentConfig, ExperimentResult, run_experiment
from pft.simulations.flower_runtime import FlowerRunSettings, run_flower_app
from pft.simulations.workspace import default_cache_root, ensure_cohort, open_cohort

#: The apps ``pft simulate --engine flower`` runs (importable ``module:attribute`` components).
SERVER_APP = "pft.server.app:app"
CLIENT_APP = "pft.client.flower_app:app"


def client_resources(num_cpus: int = 1, num_gpus: float = 0.0) -> dict[str, int | float]:
    """Validated per-node resources: ``num_cpus`` an integer in [1, cores], ``num_gpus`` in [0, 1].

    Flower's simulation crashes (and exits 0) on a fractional or too large ``num_cpus``; this
    refuses it first.
    """
    cores = os.cpu_count() or 1
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or not 1 <= num_cpus <= cores:
        raise ValueError(f"num_cpus must be an integer in [1, {cores}], got {num_cpus!r}")
    if not 0.0 <= float(num_gpus) <= 1.0:
        raise ValueError(f"num_gpus must be in [0, 1] (a fraction of one GPU per node), got {num_gpus!r}")
    return {"num_cpus": num_cpus, "num_gpus": float(num_gpus)}


def simulation_key_dir(cache_root: Path) -> Path:
    """Where the Flower engine's private keys live: ``cache_root/keys/simulation``, mode 0700 (the
    cache root is the user's own; the results folder, which is shared and published, never holds
    them)."""
    keys = cache_root / "keys" / "simulation"
    keys.mkdir(parents=True, exist_ok=True)
    os.chmod(keys.parent, 0o700)
    os.chmod(keys, 0o700)
    return keys


def simulation_keys(keys: Path) -> tuple[Path, Path, Path]:
    """A simulation's own keys under ``keys`` (made once, then reused; one maker at a time): the
    bundle-signing key pair and the virtual nodes' store key; returns (signing key, public key,
    store key) paths."""
    keys.mkdir(parents=True, exist_ok=True)
    with FileLock(str(keys / ".lock"), timeout=60):
        signing, public = keys / "bundle-signing.key", keys / "bundle-signing.pub"
        if not (signing.is_file() and public.is_file()):
            signing, public = write_signing_key_pair(keys, overwrite=True)
        store_key = keys / "store.key"
        if not store_key.is_file():
            generate_key_file(store_key)
    return signing, public, store_key


def write_flower_spec(
    config: ExperimentConfig,
    out_dir: Path,
    cache_root: Path,
    bundle_source: Path,
    *,
    min_nodes: int | None = None,
    round_timeout_s: float = 600.0,
    torch_threads: int | None = None,
) -> Path:
    """Publish the stage-2 bundle (signed, version 1) and write the apps' JSON spec; returns its path.

    Keys made here (the signing key, the nodes' store key) are the simulation's own, in
    :func:`simulation_key_dir` of ``cache_root`` (reused when present), never under ``out_dir``;
    the virtual nodes' folders are reset.
    """
    config = config.resolved()
    work = out_dir / "flower"
    signing_key_path, public_key_path, store_key = simulation_keys(simulation_key_dir(cache_root))
    # virtual nodes start fresh in every simulation (their bundle caches and stores)
    for stale in (work / "nodes", work / "bundle-v1"):
        if stale.exists():
            shutil.rmtree(stale)
    bundle_dir = work / "bundle-v1"
    publish_bundle(bundle_source, bundle_dir, 1, load_signing_key(signing_key_path))
    cohort_dir = ensure_cohort(config.cohort, cache_root)
    index = open_cohort(cohort_dir)
    targets = sorted(s for s in index.by_subject() if index.roles.get(s) == "target")
    sources = sorted(s for s in index.by_subject() if index.roles.get(s) == "source")
    node = NodeSpec(
        dataset_root=cohort_dir,
        cache_root=cache_root,
        video=config.video,
        crop=config.crop,
        subjects=tuple(targets),
        trusted_key=public_key_path,
        store_key_file=store_key,
        state_root=work / "nodes",
        torch_threads=torch_threads,
    )
    server = ServerSpec(
        out_dir=out_dir,
        bundle_dir=bundle_dir,
        trusted_key=public_key_path,
        methods=config.methods,
        seed=config.seed,
        pft=config.settings.pft,
        method_settings=config.settings.model_dump(mode="json"),
        subjects=tuple(targets),
        expected_nodes=len(targets),
        min_nodes=min_nodes or len(targets),
        round_timeout_s=round_timeout_s,
        results_meta={
            "profile": config.profile,
            "classes": list(index.classes),
            "config": config.model_dump(mode="json"),
            "subjects": {"source": len(sources), "target": len(targets)},
        },
    )
    spec = work / "spec.json"
    spec.write_text(
        json.dumps({"node": node.model_dump(mode="json"), "server": server.model_dump(mode="json")}, indent=1)
    )
    return spec


def run_flower_simulation(
    config: ExperimentConfig,
    out_dir: Path,
    cache_root: Path | None = None,
    *,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    min_nodes: int | None = None,
    client_app: str = CLIENT_APP,
    run_config: Mapping[str, str] | None = None,
    python_path: Sequence[Path] = (),
    verbose: bool = False,
    run_timeout_s: float = 3600.0,
    log: Callable[[str], None] = lambda _m: None,
) -> ExperimentResult:
    """Run the experiment of ``config`` as a Flower simulation and write results.json/report.md.

    Parameters
    ----------
    config:
        The experiment (as for ``pft simulate``); each target subject becomes one virtual node.
    out_dir, cache_root:
        Output folder, and the cache root shared with the in-process engine (it also holds the
        simulation's keys, :func:`simulation_key_dir`).
    num_cpus, num_gpus:
        Resources per virtual node (``num_cpus`` integer in [1, cores]; ``num_gpus`` fractional).
    ray_address:
        A running Ray cluster for the virtual nodes (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``);
        default: a Ray instance of the run's own on this machine.
    min_nodes:
        Quorum; default: every target subject.
    client_app:
        Another ClientApp component, ``module:attribute`` (e.g. one whose mods record replies);
        default the app. ``run_config``: extra run-config strings it reads; ``python_path``:
        folders its module is imported from.
    verbose:
        Flower's own log stream (DEBUG included) on the terminal; it always goes to
        ``out_dir/flower/flower.log``.
    run_timeout_s:
        The federation's time limit.

    Returns
    -------
    ExperimentResult
        The Flower run's results (same schema as ``pft simulate``; ``engine: "flower"``).

    Raises
    ------
    FlowerRuntimeError
        The run did not complete (the message says why, with the end of Flower's log).
    """
    resources = client_resources(num_cpus, num_gpus)
    # absolute: the apps run in other processes (and, on a Ray cluster, other working folders)
    cache_root = (Path(cache_root) if cache_root is not None else default_cache_root()).resolve()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Cohort, crops, F/C (stage 1), features and T0 (stage 2): the in-process engine's own cached
    # pipeline, run once with the cheapest method to obtain the bundle.
    prepared = run_experiment(
        config.model_copy(update={"methods": ("source_only",), "embedding_plot": False}),
        out_dir / "prepare",
        cache_root,
        log=log,
    )
    timings["prepare"] = round(time.perf_counter() - t0, 2)
    spec = write_flower_spec(
        config,
        out_dir,
        cache_root,
        Path(prepared.results["bundle"]),
        min_nodes=min_nodes,
        torch_threads=torch.get_num_threads(),
    )
    nodes = len(json.loads(spec.read_text())["node"]["subjects"])
    settings = FlowerRunSettings(
        num_supernodes=nodes,
        num_cpus=int(resources["num_cpus"]),
        num_gpus=float(resources["num_gpus"]),
        ray_address=ray_address,
        verbose=verbose,
        run_timeout_s=run_timeout_s,
    )
    results_path = out_dir / "results.json"
    results_path.unlink(missing_ok=True)
    t1 = time.perf_counter()
    run_flower_app(
        SERVER_APP,
        client_app,
        {**(run_config or {}), "pft-spec": str(spec)},
        settings,
        log_file=out_dir / "flower" / "flower.log",
        python_path=python_path,
    )
    timings["federation"] = round(time.perf_counter() - t1, 2)
    if not results_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without results ({results_path} missing)")
    results = json.loads(results_path.read_text())
    results["timings_s"] = {**timings, **results.get("timings_s", {})}
    config.resolved().write_json(out_dir / "config.json")
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    log(f"flower simulation: {nodes} node(s), {timings['federation']:.1f} s")
    return ExperimentResult(results, out_dir, timings)
