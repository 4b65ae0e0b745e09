"""One vs two raylets on the batched engine, in ONE run, and a projection to more nodes.

``python -m pft.simulations.scaling --subjects 64 --chunk-size 8 --json out.json`` starts a local
Ray cluster of one raylet (:class:`pft.simulations.cluster.LocalCluster`, ``--cpus`` CPUs),
measures ``pft bench engines --engines batched --ray-address`` on it, adds a second raylet,
measures again, takes the second raylet away and measures one raylet again (so that the load's
drift between runs shows), stops the cluster and reports the ratios. On one machine the two raylets share
its cores: the ratio is bounded by the cores (2 on the VM of docs/scale.md), not by Ray.

The projection (:func:`project`) is arithmetic on what was measured, not a measurement: with
``c`` the median seconds of one chunk on one worker CPU, ``o`` the per-chunk overhead seen by
the driver on one node (``wall - sum(chunk seconds)``, per chunk), ``b`` the bytes a chunk moves
(its result; for ``pft simulate`` also its tasks' features) over a link of ``bandwidth`` bytes/s,
``n`` nodes of ``cpus`` CPUs each give ``n * cpus * S / (c + o + b / bandwidth)`` subjects/s for
a cohort large enough to keep every CPU busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from pft.simulations.bench_engines import bench_engines
from pft.simulations.cluster import LocalCluster

__all__ = ["project", "scaling_run"]


def project(
    one_node: dict[str, Any],
    chunk_size: int,
    cpus: int,
    nodes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    bandwidth: float = 1.25e9,
    ship_features: bool = True,
) -> list[dict[str, float]]:
    """Subjects/s against node count from the one-node run's per-chunk cost and transfer sizes."""
    cluster = one_node["cluster"]
    chunk_s = statistics.median(
        a + b for a, b in zip(cluster["chunk_adapt_s"], cluster["chunk_build_s"], strict=True)
    )
    chunks = len(cluster["chunk_adapt_s"])
    busy = sum(cluster["chunk_adapt_s"]) + sum(cluster["chunk_build_s"])
    overhead = max(0.0, (one_node["wall_s"] * cpus - busy) / chunks)
    moved = cluster["chunk_state_bytes"] + (cluster["chunk_task_bytes"] if ship_features else 0)
    per_chunk = chunk_s + overhead + moved / bandwidth
    return [
        {
            "nodes": n,
            "subjects_per_s": round(n * cpus * chunk_size / per_chunk, 2),
            "chunk_s": round(chunk_s, 4),
            "overhead_s": round(overhead, 4),
            "transfer_s": round(moved / bandwidth, 6),
        }
        for n in nodes
    ]


def scaling_run(
    subjects: int, chunk_size: int, *, cpus: int = 1, iterations: int = 50, log: Any = print
) -> dict[str, Any]:
    """Both measurements on one local cluster (one raylet, then two) and the projection."""
    common = {"engines": ("batched",), "iterations": iterations, "chunk_size": chunk_size, "bias_only": True}
    result: dict[str, Any] = {"subjects": subjects, "chunk_size": chunk_size, "cpus_per_node": cpus}
    result["load_average_before"] = list(os.getloadavg())
    with LocalCluster(nodes=1, cpus=cpus, timeout_s=120) as cluster:
        log(f"one raylet at {cluster.address}")
        one = bench_engines(subjects, ray_address=cluster.address, log=log, **common)  # type: ignore[arg-type]
        cluster.add_node()
        log("two raylets")
        two = bench_engines(subjects, ray_address=cluster.address, log=log, **common)  # type: ignore[arg-type]
        cluster.remove_node()
        log("one raylet again (the load drifts: this run shows by how much)")
        again = bench_engines(subjects, ray_address=cluster.address, log=log, **common)  # type: ignore[arg-type]
    result["load_average_after"] = list(os.getloadavg())
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["machine"] = one["machine"]
    result["one_raylet"] = one["engines"]["batched"]
    result["two_raylets"] = two["engines"]["batched"]
    result["one_raylet_again"] = again["engines"]["batched"]
    if "subjects_per_s" in result["one_raylet"] and "subjects_per_s" in result["two_raylets"]:
        rate2 = result["two_raylets"]["subjects_per_s"]
        result["ratio"] = round(rate2 / result["one_raylet"]["subjects_per_s"], 3)
        if "subjects_per_s" in result["one_raylet_again"]:
            result["ratio_to_one_raylet_again"] = round(
                rate2 / result["one_raylet_again"]["subjects_per_s"], 3
            )
        result["projection"] = project(result["one_raylet"], chunk_size, cpus)
        result["projection_bench"] = project(result["one_raylet"], chunk_size, cpus, ship_features=False)
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m pft.simulations.scaling --subjects 64 --chunk-size 8 --json FILE``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subjects", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per raylet")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = scaling_run(args.subjects, args.chunk_size, cpus=args.cpus, iterations=args.iterations)
    text = json.dumps(result, indent=2) + "\n"
    if args.json is not None:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
