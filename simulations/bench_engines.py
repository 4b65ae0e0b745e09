"""Subjects adapted per second by each engine, side by side in ONE run (``pft bench engines``).

Engines: ``loop`` (the per-client trainer, one subject after another - what ``pft simulate`` runs),
``batched`` (:mod:`pft.simulations.batched`, stacked translators, replaying each subject's random
streams exactly as the trainer draws them), ``batched_fast`` (the same engine with
``rng="fast"``: per-subject generators, one block of random words per subject and step, 16-bit
dropout draws) and ``flower`` (Flower's simulation engine through ``flwr run`` and a SuperLink of
the run's own, :mod:`pft.simulations.flower_runtime`: one virtual node per subject, each running
the same per-client adaptation in a Ray actor).

Same work for every engine: the synthetic cached-feature subjects of
:mod:`pft.simulations.synthetic_world` (each engine - each Flower node - builds subject k's features
from the seed; nothing is re-extracted), the same source model, and a fixed number of iterations
(``min_iterations = max_iterations``, so no engine stops early) at the same batch size. Only the
adaptation is timed (``wall_s``; for Flower inside its ServerApp, so the SuperLink's and ``flwr
run``'s start-up are outside it); each engine runs in its own child process so that its peak memory
is its own: ``peak_rss_mb`` is the peak over the run of the summed VmRSS of the child and every
process it started (Ray's workers for Flower), sampled every 50 ms; ``vmhwm_mb`` is the child's own
VmHWM. ``gflops`` is the useful translator-training rate: ``subjects x iterations x batch x 6 x
params(T) / wall_s``; ``matmul_gflops`` is this machine's dense fp32 matrix-multiply rate,
measured in the same run with the same thread count.

``threads`` is every engine's CPU budget: ``loop`` and ``batched`` run that many intra-op threads;
``flower`` gets that many Ray CPUs, so that many actors (one virtual node at a time each) with one
intra-op thread each. With ``ray_address`` the batched engines and ``flower`` run on that cluster
and use its CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pft.core.adaptation import ModelParts
from pft.core.machine import describe_machine
from pft.simulations.batched import BatchedConfig, SubjectTask, adapt_subjects
from pft.simulations.batched.engine import adapt_chunk
from pft.simulations.bench_work import adapt_one, iter_tasks, make_tasks, work_config
from pft.simulations.synthetic_world import synthetic_model

ENGINES = ("loop", "batched", "batched_fast", "flower")


def matmul_gflops(threads: int, size: int = 1024, seconds: float = 2.0) -> float:
    """Dense fp32 ``size x size`` matrix-multiply rate (GFLOP/s, median of timed repeats)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        rates: list[float] = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(rates) < 5:
            t0 = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * size**3 / (time.perf_counter() - t0) / 1e9)
        return round(statistics.median(rates), 1)
    finally:
        torch.set_num_threads(before)


def _vm_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def run_engine(engine: str, spec: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run one engine in a child process; its numbers plus the peak RSS of its process tree."""
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        out = Path(tmp) / "result.json"
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({**spec, "work_dir": tmp}))
        module = "pft.simulations.bench_engines"
        cmd = [sys.executable, "-m", module, "--child", engine, str(spec_path), str(out)]
        proc = subprocess.Popen(cmd)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], sum(_vm_kb(p, "VmRSS") for p in _tree(proc.pid)))
                stop.wait(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        finally:
            stop.set()
            thread.join()
            if proc.poll() is None:
                proc.kill()
        if rc != 0 or not out.is_file():
            return {"error": f"exit status {rc}"}
        result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = round(peak[0] / 1024, 1)
    n = spec["subjects"]
    flops = n * spec["iterations"] * spec["batch_size"] * 6 * spec["translator_params"]
    result["subjects_per_s"] = round(n / result["wall_s"], 3)
    result["gflops"] = round(flops / result["wall_s"] / 1e9, 2)
    result["peak_rss_mb_per_subject"] = round(result["peak_rss_mb"] / n, 3)
    return result


def bench_engines(
    subjects: int,
    *,
    engines: tuple[str, ...] = ENGINES,
    iterations: int = 50,
    batch_size: int = 64,
    bias_only: bool = False,
    chunk_size: int = 256,
    threads: int = 1,
    device: str = "cpu",
    fused_adam: bool = True,
    frames: int = 96,
    seed: int = 0,
    ray_address: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Measure ``engines`` on ``subjects`` synthetic subjects in one run; returns the JSON dict.

    ``ray_address``: the batched engines run their chunks as Ray tasks on that cluster (each task
    builds its chunk's subjects from the seed, so only a range travels), and ``flower``'s virtual
    nodes are Ray actors there (the spec travels in the run config); ``loop`` is refused with it
    (it is measured on one machine).
    """
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    if ray_address is not None and "loop" in engines:
        raise ValueError(
            "--ray-address measures the engines that run on Ray; use --engines batched,batched_fast,flower"
        )
    model = synthetic_model(seed)
    params = model.translator.param_count()
    spec = {
        "subjects": subjects,
        "iterations": iterations,
        "batch_size": batch_size,
        "bias_only": bias_only,
        "chunk_size": chunk_size,
        "threads": threads,
        "device": device,
        "fused_adam": fused_adam,
        "frames": frames,
        "seed": seed,
        "translator_params": params,
        "ray_address": ray_address,
    }
    result: dict[str, Any] = {
        "subjects": subjects,
        "machine": {**describe_machine(), "load_average": list(os.getloadavg())},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "work": {**spec, "flop_per_subject": iterations * batch_size * 6 * params},
        "matmul_gflops": matmul_gflops(threads),
        "engines": {},
    }
    for engine in engines:
        log(f"engine {engine}: {subjects} subjects ...")
        result["engines"][engine] = run_engine(engine, spec)
        log(f"  {json.dumps(result['engines'][engine])}")
    rates = {e: r["subjects_per_s"] for e, r in result["engines"].items() if "subjects_per_s" in r}
    for mine in ("batched", "batched_fast"):
        if mine in rates:
            result[f"{mine}_vs"] = {e: round(rates[mine] / v, 2) for e, v in rates.items() if e != mine}
            result[f"{mine}_fraction_of_matmul"] = round(
                result["engines"][mine]["gflops"] / result["matmul_gflops"], 3
            )
    result["machine"]["load_average_after"] = list(os.getloadavg())
    return result


# --- children ---------------------------------------------------------------------------------------
def _batched_config(engine: str, spec: dict[str, Any]) -> BatchedConfig:
    return BatchedConfig(
        chunk_size=spec["chunk_size"],
        device=spec["device"],
        num_threads=spec["threads"],
        fused_adam=spec["fused_adam"],
        rng="fast" if engine == "batched_fast" else "exact",
    )


def bench_chunk(engine: str, spec: dict[str, Any], start: int, stop: int) -> dict[str, float]:
    """One chunk of the benchmark on a Ray worker: build subjects ``start..stop-1`` from the seed,
    adapt them; the seconds of each part and the iterations done."""
    t0 = time.perf_counter()
    tasks = make_tasks(spec, range(start, stop))
    model = synthetic_model(spec["seed"])
    t1 = time.perf_counter()
    config = work_config(spec["iterations"], spec["batch_size"], spec["bias_only"])
    chunk = adapt_chunk(
        model.translator, model.classifier, tasks, config, _batched_config(engine, spec), start
    )
    return {
        "build_s": t1 - t0,
        "adapt_s": time.perf_counter() - t1,
        "iterations": sum(a.iterations for a in chunk),
        "state_bytes": sum(v.numel() * v.element_size() for a in chunk for v in a.state.values()),
        "task_bytes": sum(t.features.numel() * t.features.element_size() for t in tasks),
    }


def _warm(_k: int) -> int:
    """A first task per worker: imports the engine (not timed with the chunks)."""
    return len(ENGINES)


def _batched_on_ray(engine: str, spec: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
    """The batched engine's chunks as Ray tasks on ``spec["ray_address"]``: driver wall from the
    first chunk submitted to the last result, and per-chunk cost, node and transfer sizes."""
    import ray

    from pft.simulations.cluster import ray_session, run_tasks

    n, size = spec["subjects"], spec["chunk_size"]
    ranges = [(engine, spec, a, min(a + size, n)) for a in range(0, n, size)]
    with ray_session(spec["ray_address"]):
        cpus = int(ray.cluster_resources().get("CPU", 1))
        run_tasks(_warm, [(k,) for k in range(2 * cpus)])
        nodes: dict[str, int] = {}
        t0 = time.perf_counter()
        chunks = run_tasks(
            bench_chunk,
            ranges,
            total=len(ranges),
            progress=lambda d, t, r: nodes.update({r.node: nodes.get(r.node, 0) + 1}),
        )
        wall = time.perf_counter() - t0
        alive = sum(1 for node in ray.nodes() if node["Alive"])
    cluster = {
        "nodes": alive,
        "cpus": cpus,
        "chunks_per_node": sorted(nodes.values()),
        "chunk_adapt_s": [round(c["adapt_s"], 3) for c in chunks],
        "chunk_build_s": [round(c["build_s"], 3) for c in chunks],
        "chunk_state_bytes": int(statistics.median(c["state_bytes"] for c in chunks)),
        "chunk_task_bytes": int(statistics.median(c["task_bytes"] for c in chunks)),
    }
    return wall, int(sum(c["iterations"] for c in chunks)), cluster


def _child(engine: str, spec: dict[str, Any], out: Path) -> None:
    torch.set_num_threads(spec["threads"])
    n = spec["subjects"]
    iterations = 0
    extra: dict[str, Any] = {}
    if engine == "flower":
        wall, iterations = _flower(spec)
    elif engine == "loop":
        tasks = make_tasks(spec, range(n))
        model = synthetic_model(spec["seed"])
        t0 = time.perf_counter()
        parts = ModelParts(classifier=model.classifier, translator=model.translator)
        for task in tasks:
            iterations += adapt_one(spec, task, parts)
        wall = time.perf_counter() - t0
    elif spec.get("ray_address"):
        wall, iterations, cluster = _batched_on_ray(engine, spec)
        extra["cluster"] = cluster
    else:
        # Built per chunk as the engine reads them, so memory is one chunk's whatever N. The time
        # spent building subjects (the loop builds its own before its clock starts) is measured
        # and taken out of the engine's wall.
        build = [0.0]

        def timed_tasks() -> Iterator[SubjectTask]:
            source = iter_tasks(spec, range(n))
            while True:
                t = time.perf_counter()
                task = next(source, None)
                build[0] += time.perf_counter() - t
                if task is None:
                    return
                yield task

        tasks_iter = timed_tasks()
        model = synthetic_model(spec["seed"])
        t0 = time.perf_counter()
        config = work_config(spec["iterations"], spec["batch_size"], spec["bias_only"])
        batched = _batched_config(engine, spec)
        for chunk in adapt_subjects(model.translator, model.classifier, tasks_iter, config, batched):
            iterations += sum(a.iterations for a in chunk)
        wall = time.perf_counter() - t0 - build[0]
    out.write_text(
        json.dumps(
            {
                "wall_s": round(wall, 3),
                "iterations": iterations,
                "vmhwm_mb": round(_vm_kb(os.getpid(), "VmHWM") / 1024, 1),
                **extra,
            }
        )
    )


#: The Flower child's run limit: below :func:`run_engine`'s 1800 s, so that a run past it stops
#: its SuperLink and Ray itself (a killed child would leave them running).
FLOWER_RUN_TIMEOUT_S = 1500.0


def _flower(spec: dict[str, Any]) -> tuple[float, int]:
    """The benchmark's Flower apps through ``flwr run`` (a SuperLink of the run's own); the wall
    and iterations the ServerApp wrote to ``work_dir/flower-done.json``."""
    from pft.simulations.bench_flower_apps import CLIENT_APP, SERVER_APP, SPEC_KEY
    from pft.simulations.flower_runtime import FlowerRunSettings, run_flower_app

    work = Path(spec["work_dir"])
    ray_address = spec.get("ray_address")
    settings = FlowerRunSettings(
        num_supernodes=spec["subjects"],
        # the same CPU budget as the other engines: ``threads`` Ray CPUs, one actor (1 thread)
        # each; on a cluster, its CPUs (as the batched engines' tasks)
        num_cpus=1,
        num_gpus=0.0,
        ray_num_cpus=None if ray_address else spec["threads"],
        ray_address=ray_address,
        run_timeout_s=FLOWER_RUN_TIMEOUT_S,
    )
    # the spec itself (a few numbers), not a path: a node on another machine needs no file
    run_config = {SPEC_KEY: json.dumps(spec)}
    run_flower_app(SERVER_APP, CLIENT_APP, run_config, settings, log_file=work / "flower.log")
    done = json.loads((work / "flower-done.json").read_text())
    return float(done["wall_s"]), int(done["iterations"])


def main(argv: list[str] | None = None) -> None:
    """``python -m pft.simulations.bench_engines --subjects 100 --json out.json`` (``pft bench engines``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bias-only", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--exact-adam", action="store_true", help="batched: the trainer's unfused Adam")
    parser.add_argument(
        "--ray-address", default=None, help="batched engines: chunks as Ray tasks there; flower: its actors"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child:
        engine, spec_path, out = args.child
        _child(engine, json.loads(Path(spec_path).read_text()), Path(out))
        return
    result = bench_engines(
        args.subjects,
        engines=tuple(e.strip() for e in args.engines.split(",") if e.strip()),
        iterations=args.iterations,
        batch_size=args.batch_size,
        bias_only=args.bias_only,
        chunk_size=args.chunk_size,
        threads=args.threads,
        device=args.device,
        fused_adam=not args.exact_adam,
        ray_address=args.ray_address,
    )
    text = json.dumps(result, indent=2) + "\n"
    if args.json is not None:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
