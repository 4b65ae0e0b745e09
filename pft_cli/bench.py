"""`pft bench`: the benchmark suite (JSON out; docs/benchmarks.md and docs/scale.md record runs)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pft.cli.extras import require_extra
from pft.cli.progress import console

if TYPE_CHECKING:
    from rich.table import Table

bench_app = typer.Typer(
    help="Benchmarks: engines side by side, adaptation latency, feature throughput, pipeline, "
    "methods, SDK. Each prints JSON (and writes it with --json).",
    no_args_is_help=True,
)


@bench_app.callback()
def _needs_sim() -> None:
    """Benchmarks: engines, adaptation latency, features, pipeline, methods, SDK (JSON out)."""
    require_extra("bench", "sim", "matplotlib", "sklearn", "skimage", "onnxruntime", "ray", "flwr")


def _emit(result: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(result, indent=2) + "\n"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    typer.echo(text)


JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the JSON result to this file.")]


@bench_app.command("engines")
def engines(
    subjects: Annotated[int, typer.Option(help="Synthetic cached-feature subjects N.")] = 100,
    json_out: JsonOpt = None,
    engine_list: Annotated[
        str, typer.Option("--engines", help="Comma-separated: loop, batched, batched_fast, flower.")
    ] = "loop,batched,batched_fast,flower",
    iterations: Annotated[int, typer.Option(help="Fixed adaptation steps per subject.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Frames per step.")] = 64,
    bias_only: Annotated[bool, typer.Option(help="Adapt only T's output bias (default: all of T).")] = False,
    chunk_size: Annotated[int, typer.Option(help="Batched engine: subjects per chunk.")] = 256,
    threads: Annotated[int, typer.Option(help="Intra-op threads (engines and the matmul probe).")] = 1,
    device: Annotated[str, typer.Option(help="Batched engine device (cpu, cuda).")] = "cpu",
    exact_adam: Annotated[bool, typer.Option(help="Batched engine: the trainer's unfused Adam.")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Batched engines: their chunks as Ray tasks on this cluster (auto or HOST:PORT); "
            "flower: its virtual nodes as Ray actors there; not with loop (docs/scale.md)."
        ),
    ] = None,
) -> None:
    """Subjects/s, useful GFLOP/s and peak RSS of loop, batched and Flower engines, in ONE run."""
    from pft.core.errors import PFTError
    from pft.simulations.bench_engines import bench_engines
    from pft.simulations.cluster import check_ray_address

    chosen = tuple(e.strip() for e in engine_list.split(",") if e.strip())
    if ray_address is not None:
        try:
            check_ray_address(ray_address)
        except PFTError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        if "loop" in chosen:
            console.print("[red]error:[/red] --ray-address runs with --engines batched,batched_fast,flower")
            raise typer.Exit(2)

    result = bench_engines(
        subjects,
        engines=chosen,
        iterations=iterations,
        batch_size=batch_size,
        bias_only=bias_only,
        chunk_size=chunk_size,
        threads=threads,
        device=device,
        fused_adam=not exact_adam,
        ray_address=ray_address,
        log=lambda m: console.print(m),
    )
    _emit(result, json_out)
    console.print(engines_table(result))


def engines_table(result: dict[str, Any]) -> Table:
    """The engines run as a table (stderr; the JSON on stdout stays the record)."""
    from rich.table import Table

    matmul = result["matmul_gflops"]
    rates = {e: r["subjects_per_s"] for e, r in result["engines"].items() if "subjects_per_s" in r}
    table = Table(title=f"{result['subjects']} subjects, matmul {matmul} GFLOP/s (same run)")
    table.add_column("engine", no_wrap=True)
    for column in ("subj/s", "useful GFLOP/s", "of matmul", "peak RSS MB", "wall s", "vs Flower"):
        table.add_column(column, justify="right")
    for engine, row in result["engines"].items():
        if "error" in row:
            table.add_row(engine, row["error"], "", "", "", "", "")
            continue
        ratio = f"{rates[engine] / rates['flower']:.1f}x" if "flower" in rates else "-"
        table.add_row(
            engine,
            f"{row['subjects_per_s']:.2f}",
            f"{row['gflops']:.1f}",
            f"{row['gflops'] / matmul:.0%}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['wall_s']:.1f}",
            ratio,
        )
    return table


@bench_app.command("adapt")
def adapt(
    repeats: Annotated[int, typer.Option(help="Timed runs (median reported).")] = 7,
    bias_only: Annotated[bool, typer.Option(help="The default bias-only stage 3, or all of T.")] = True,
    json_out: JsonOpt = None,
) -> None:
    """Adaptation latency of one subject (translator only, cached features): median of runs."""
    from pft.simulations.bench_latency import bench_adapt

    _emit(bench_adapt(repeats, bias_only=bias_only), json_out)


@bench_app.command("features")
def features(
    frames: Annotated[int, typer.Option(help="Frames through F.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Frames per forward pass.")] = 128,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: torch's).")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Feature-extraction throughput of F on CPU (frames/s)."""
    from pft.simulations.bench_latency import bench_features

    _emit(bench_features(frames, batch_size, threads=threads), json_out)


@bench_app.command("pipeline")
def pipeline(
    videos: Annotated[list[Path] | None, typer.Argument(help="Videos (default: generated clips).")] = None,
    repeats: Annotated[int, typer.Option(help="Repeats per video.")] = 3,
    json_out: JsonOpt = None,
) -> None:
    """Frames/s through decode -> detect -> crop (isolated and in-process)."""
    from pft.core.machine import describe_machine
    from pft.simulations.bench_pipeline import bench_pipeline, make_astronaut_videos

    with tempfile.TemporaryDirectory() as tmp:
        paths = list(videos or []) or make_astronaut_videos(Path(tmp))
        result = bench_pipeline(paths, repeats)
    result["machine"] = describe_machine()
    _emit(result, json_out)


@bench_app.command("detectors")
def detectors(
    names: Annotated[
        str, typer.Option("--detectors", help="Comma-separated: dlib-hog, dlib-cnn, mtcnn, haar.")
    ] = "dlib-hog,dlib-cnn,mtcnn,haar",
    json_out: JsonOpt = None,
) -> None:
    """Face detectors on real material from installed packages: recall, false positives, frames/s."""
    from pft.simulations.bench_detectors import bench_detectors

    _emit(bench_detectors(tuple(n.strip() for n in names.split(",") if n.strip())), json_out)


@bench_app.command("methods")
def methods(
    out: Annotated[Path, typer.Option(help="Output folder (bench_methods.json/.md).")],
    profile: Annotated[str, typer.Option(help="Cohort profile.")] = "biovid",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    source_subjects: Annotated[int | None, typer.Option(help="Source subjects.")] = None,
    target_subjects: Annotated[int | None, typer.Option(help="Target subjects.")] = None,
    method_list: Annotated[str, typer.Option("--methods", help="Comma-separated or 'all'.")] = "all",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache root.")] = None,
) -> None:
    """Accuracy, iterations, wall time, parameters and memory of every method, in one run."""
    from pft.simulations.bench_methods import bench_methods, markdown
    from pft.simulations.experiment import ExperimentConfig

    config = ExperimentConfig.model_validate(
        {
            "profile": profile,
            "seed": seed,
            "source_subjects": source_subjects,
            "target_subjects": target_subjects,
        }
    )
    chosen = None if method_list == "all" else tuple(m.strip() for m in method_list.split(",") if m.strip())
    result = bench_methods(config, out, cache_dir, chosen, log=lambda m: console.print(m))
    typer.echo(markdown(result))


@bench_app.command("sdk")
def sdk(
    out: Annotated[Path | None, typer.Option(help="Work folder (default: a temporary one).")] = None,
    repeats: Annotated[int, typer.Option(help="Repeats per measurement.")] = 3,
    json_out: JsonOpt = None,
) -> None:
    """On-device SDK: enrollment (cold/warm), per-frame latency, export sizes, peak RSS."""
    from pft.simulations.bench_sdk import bench_sdk

    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_sdk(Path(tmp), repeats)
    else:
        result = bench_sdk(out, repeats)
    _emit(result, json_out)
