"""`pft benchmark`: the experiment over profiles x seeds x methods, resumable, with statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pft.cli.choices import PROFILE_NAMES
from pft.cli.progress import console, live_progress, plain_lines, stage_line


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; ``"100-102"`` ranges allowed."""
    seeds: list[int] = []
    for part in _csv(text):
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                seeds.extend(range(low, high + 1))
            else:
                seeds.append(int(part))
        except ValueError as exc:
            raise typer.BadParameter(
                f"{part!r} is not a seed or a range like 100-102", param_hint="--seeds"
            ) from exc
    if not seeds:
        raise typer.BadParameter("give at least one seed", param_hint="--seeds")
    return tuple(seeds)


@contextmanager
def overall_display(
    enabled: bool,
) -> Iterator[tuple[Callable[[str, int], Callable[[int, int], None]], Callable[[int, int, str], None]]]:
    """ONE rich display for the whole benchmark: a bar of runs done and, under it, the stage of the
    run in progress (the same row, re-labelled at each stage). Yields ``(stage_factory, on_run)``."""
    if not enabled:
        yield (lambda _d, _t: lambda _a, _b: None), (lambda _d, _t, _l: None)
        return
    if plain_lines():  # a log, not a terminal: one line per stage and per run
        import time

        started = time.monotonic()

        def plain_stage(description: str, total: int) -> Callable[[int, int], None]:
            stage_line(f"  {description}", total, started)
            return lambda _a, _b: None

        def plain_run(done: int, total: int, label: str) -> None:
            stage_line(f"benchmark: {done}/{total} runs done ({label})", None, started)

        yield plain_stage, plain_run
        return
    with live_progress(52) as progress:
        runs = progress.add_task("benchmark: runs", total=1)
        stage_task = progress.add_task("  (starting)", total=1)

        def on_run(done: int, total: int, label: str) -> None:
            progress.update(
                runs, completed=done, total=max(total, 1), description=f"benchmark: runs ({label})"
            )

        def stage(description: str, total: int) -> Callable[[int, int], None]:
            progress.update(stage_task, description=f"  {description}", completed=0, total=max(total, 1))

            def step(done: int, new_total: int) -> None:
                progress.update(stage_task, completed=done, total=max(new_total, 1))

            return step

        yield stage, on_run


def benchmark(
    profiles: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated profiles ({', '.join(PROFILE_NAMES)}, or registered ones) or 'all' "
            "(the four built-in ones)."
        ),
    ] = "all",
    seeds: Annotated[
        str,
        typer.Option(
            help="Comma-separated cohort seeds (ranges like 100-102 allowed). Test seeds (< 100) are "
            "reported; validation seeds (>= 100) are where defaults are chosen; never averaged together."
        ),
    ] = "0,1,2",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods, registered ones included (docs/extending.md), or 'all' "
            "(default: source_only,pft,oracle)."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Benchmark folder: runs/, benchmark.json, report.md, plots.")
    ] = Path("runs/benchmark"),
    engine: Annotated[str, typer.Option(help="loop, batched or flower (as for pft simulate).")] = "loop",
    source_subjects: Annotated[
        int | None, typer.Option(help="Source subjects per cohort (default: the profile's).")
    ] = None,
    target_subjects: Annotated[
        int | None, typer.Option(help="Target subjects per cohort (default: the profile's, 10).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON/YAML file of ExperimentConfig fields for every run.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache root shared by every run. Default $PFT_CACHE_DIR or ~/.cache/pft."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Batched engine: CPU threads (default 1).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Batched engine: torch device (cpu, cuda).")] = None,
    num_cpus: Annotated[int, typer.Option(help="Flower engine: CPUs per virtual node.")] = 1,
    num_gpus: Annotated[float, typer.Option(help="Flower engine: GPUs per virtual node.")] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Batched engine: every run's chunks as Ray tasks on this cluster (auto or HOST:PORT; "
            "same numbers; docs/scale.md)."
        ),
    ] = None,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="Run PFT's stage 3 with DP-SGD at this epsilon per subject.")
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="DP delta (with --dp-epsilon).")] = 1e-5,
    dp_unit: Annotated[str, typer.Option(help="DP privacy unit: frame, video or person.")] = "frame",
    dp_accountant: Annotated[str, typer.Option(help="DP accountant: rdp or prv.")] = "rdp",
    progress: Annotated[bool, typer.Option(help="Show the progress display.")] = True,
) -> None:
    """Run `pft simulate` for every (profile, seed), resumably, and report the methods with statistics.

    A finished (profile, seed) under OUT/runs/ is reused; an interrupted one restarts. Writes
    benchmark.json and report.md: per profile the paper-style table (seeds averaged), mean macro-F1
    with a 95% bootstrap CI over subject-seeds, the share of the source-to-oracle gap recovered, a
    Wilcoxon signed-rank test against source-only, wins/ties/losses, per-class F1, confusion and
    error-bar plots, and warnings (docs/benchmark.md).
    """
    from pydantic import ValidationError

    from pft.cli.simulate import load_config_file, with_dp
    from pft.core.errors import PFTError
    from pft.core.methods import method_names
    from pft.simulations.analysis import summary_lines
    from pft.simulations.benchmark import BenchmarkConfig, run_benchmark
    from pft.simulations.experiment import DEFAULT_METHODS

    if ray_address is not None:
        from pft.simulations.cluster import check_ray_address

        try:
            check_ray_address(ray_address)
        except PFTError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        if engine != "batched":
            console.print("[red]error:[/red] --ray-address runs with --engine batched")
            raise typer.Exit(2)
    base = load_config_file(config)
    batched = {k: v for k, v in {"num_threads": threads, "device": device}.items() if v is not None}
    if batched:
        base = {**base, "batched": {**base.get("batched", {}), **batched}}
    if dp_epsilon is not None:
        base = with_dp(base, dp_epsilon, dp_delta, dp_unit, dp_accountant)
    chosen_methods = (
        list(method_names())
        if methods == "all"
        else _csv(methods)
        if methods is not None
        else list(DEFAULT_METHODS)
    )
    overrides = {
        "methods": chosen_methods,
        "engine": engine,
        "source_subjects": source_subjects,
        "target_subjects": target_subjects,
    }
    experiment = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        bench_config = BenchmarkConfig.model_validate(
            {
                "profiles": list(PROFILE_NAMES) if profiles == "all" else _csv(profiles),
                "seeds": parse_seeds(seeds),
                "experiment": experiment,
                "num_cpus": num_cpus,
                "num_gpus": num_gpus,
            }
        )
    except ValidationError as exc:
        console.print(f"[red]invalid configuration:[/red]\n{exc}")
        raise typer.Exit(2) from exc
    try:
        with overall_display(progress) as (stage, on_run):
            result = run_benchmark(
                bench_config,
                out,
                cache_dir,
                progress=stage,
                on_run=on_run,
                log=lambda m: console.print(m, style="dim", markup=False, highlight=False),
                ray_address=ray_address,
            )
    except PFTError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    for group in result.benchmark["groups"]:
        seeds_text = ", ".join(str(s) for s in group["seeds"])
        typer.echo(f"{group['profile']} ({group['role']} seeds {seeds_text}):")
        for line in summary_lines(group):
            if line.startswith("warning:"):
                console.print(f"  {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)
            else:
                typer.echo(f"  {line}")
    reused = sum(r.status == "reused" for r in result.runs)
    typer.echo(f"benchmark: {len(result.runs)} run(s), {reused} reused -> {result.report}")
