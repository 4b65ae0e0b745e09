"""`pft simulate`: the project's main job - per-subject personalisation on a cohort."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pft.cli.choices import DEFAULT_METHOD_NAMES, METHOD_NAMES, PROFILE_NAMES
from pft.cli.extras import require_extra
from pft.cli.failure import fail
from pft.cli.progress import console, stage_bars
from pft.core.errors import ConfigFileError, PFTError

if TYPE_CHECKING:  # imported in the commands: `pft --help` loads no torch
    from pft.simulations.experiment import ExperimentConfig


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A JSON or YAML experiment config file as a dict (empty without a file).

    Raises
    ------
    ConfigFileError
        The file is missing, unreadable, torn or not a mapping (never a parser traceback).
    """
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigFileError(f"--config {path}: no such file")
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigFileError(f"--config {path}: not valid {kind} ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: must hold a mapping of config fields")
    return data


def check_resources(
    cache_dir: Path | None, *, threads: int | None, device: str | None, num_cpus: int, engine: str
) -> None:
    """The machine-dependent options, checked before any work (one typed error naming the option).

    Raises
    ------
    ResourceError
        A cache folder that is a file, more threads or CPUs than this machine has, a device it lacks.
    """
    from pft.core.resources import check_cache_root, check_cpu_count, check_torch_device
    from pft.simulations.workspace import default_cache_root

    check_cache_root(cache_dir if cache_dir is not None else default_cache_root())
    if threads is not None:
        check_cpu_count(threads, "--threads")
    if device is not None:
        check_torch_device(device, "--device")
    if engine == "flower":
        check_cpu_count(num_cpus, "--num-cpus")


def build_config(base: dict[str, Any], **overrides: Any) -> ExperimentConfig:
    """Merge command-line overrides (those not None) into a config dict and validate it."""
    from pft.simulations.experiment import ExperimentConfig

    merged = dict(base)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return ExperimentConfig.model_validate(merged)


def with_dp(base: dict[str, Any], epsilon: float, delta: float, unit: str, accountant: str) -> dict[str, Any]:
    """``base`` with ``settings.pft.dp`` set (validated with the rest of the config)."""
    merged = json.loads(json.dumps(base))
    pft = merged.setdefault("settings", {}).setdefault("pft", {})
    pft["dp"] = {"epsilon": epsilon, "delta": delta, "privacy_unit": unit, "accountant": accountant}
    return merged


def simulate(
    profile: Annotated[
        str,
        typer.Option(
            help=f"Cohort profile: {', '.join(PROFILE_NAMES)}, a registered one (docs/extending.md), "
            "or 'all' for the four built-in profiles."
        ),
    ] = "biovid",
    seed: Annotated[
        int, typer.Option(help="Seed of the cohort and every stage (same seed, same numbers).")
    ] = 0,
    out: Annotated[
        Path, typer.Option(help="Output folder (results.json, report.md, plots, config.json).")
    ] = Path("runs/simulate"),
    methods: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated methods ({', '.join(METHOD_NAMES)}, or registered ones: "
            "docs/extending.md) or 'all' (registered ones included). "
            f"Default: {','.join(DEFAULT_METHOD_NAMES)}."
        ),
    ] = None,
    source_subjects: Annotated[
        int | None, typer.Option(help="Source subjects (default: the profile's).")
    ] = None,
    target_subjects: Annotated[
        int | None, typer.Option(help="Target subjects (default: the profile's, 10).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON/YAML file of ExperimentConfig fields; flags override it.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache root (cohorts, crops, features, models). Default $PFT_CACHE_DIR or ~/.cache/pft."
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="loop: subjects one after another in this process; flower: one Flower virtual node each; "
            "batched: many subjects' translators adapted at once (stacked, same numbers as loop)."
        ),
    ] = "loop",
    chunk_size: Annotated[
        int | None, typer.Option(help="Batched engine: subjects per chunk (bounds memory; default 256).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Batched engine: torch device, e.g. cpu or cuda (default cpu).")
    ] = None,
    rng: Annotated[
        str | None,
        typer.Option(
            help="Batched engine: exact (replay the per-client engine's random draws; same numbers) "
            "or fast (per-subject draws in bulk; same distributions, not the same draws)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Batched engine: CPU threads for its matrix products and per-subject draws "
            "(default 1; set it to the core count on a machine you have to yourself).",
        ),
    ] = None,
    num_cpus: Annotated[
        int, typer.Option(help="Flower engine: CPUs per virtual node (integer, 1..cores).")
    ] = 1,
    num_gpus: Annotated[
        float, typer.Option(help="Flower engine: GPUs per virtual node (fractional, e.g. 0.1).")
    ] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Batched engine: run its chunks as Ray tasks on this cluster; flower engine: run its "
            "virtual nodes on it (auto, HOST:PORT or ray://HOST:PORT; same numbers as in-process; "
            "docs/scale.md). Default: in this process (flower: a Ray instance of the run's own)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    verbose: Annotated[
        bool,
        typer.Option(
            help="Flower engine: show Flower's own log stream (its DEBUG lines and warnings) here; "
            "without it they go only to OUT/flower/flower.log."
        ),
    ] = False,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Run PFT's stage 3 with DP-SGD (Opacus) at this epsilon per subject (docs/privacy.md)."
        ),
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="DP delta (with --dp-epsilon).")] = 1e-5,
    dp_unit: Annotated[
        str, typer.Option(help="DP privacy unit: frame, video (one clip) or person (with --dp-epsilon).")
    ] = "frame",
    dp_accountant: Annotated[
        str, typer.Option(help="DP accountant: rdp or prv (with --dp-epsilon).")
    ] = "rdp",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Run on this dataset folder instead of the synthetic cohort (docs/datasets.md): "
            "subjects split into source and target, a target's videos into adapt/oracle/eval."
        ),
    ] = None,
    layout: Annotated[
        str,
        typer.Option(help="With --data: generic, biovid, stressid, bah, affwild2 or a registered layout."),
    ] = "generic",
    split: Annotated[
        Path | None, typer.Option(help="With --data: a split file (JSON) overriding the seeded split.")
    ] = None,
    detector: Annotated[
        str, typer.Option(help="With --data: face detector (auto, dlib-hog, dlib-cnn, mtcnn, haar).")
    ] = "auto",
    pretrained: Annotated[
        Path | None,
        typer.Option(help="Start stage 1 from these F weights (safetensors; torchvision resnet18 keys)."),
    ] = None,
) -> None:
    """Run SFDA-PFT per target subject on a synthetic cohort (or --data) and write the results.

    Makes (or reuses) the cohort, trains (or reuses) the source model and translator, adapts one
    translator per target subject from its NEUTRAL videos only, evaluates on its held-out videos.
    With --data the same pipeline runs on a dataset folder (real faces through a real detector).
    """
    flower = ("ray", "flwr") if engine == "flower" else ("ray",) if ray_address is not None else ()
    require_extra("simulate", "sim", "matplotlib", "sklearn", *flower)
    from pydantic import ValidationError

    from pft.core.methods import method_names
    from pft.simulations.experiment import PROFILES, run_experiment

    try:
        base = load_config_file(config)
        check_resources(cache_dir, threads=threads, device=device, num_cpus=num_cpus, engine=engine)
        if ray_address is not None:
            from pft.simulations.cluster import check_ray_address

            check_ray_address(ray_address)
    except PFTError as exc:
        raise fail(exc, code=2) from exc
    if ray_address is not None and engine not in ("batched", "flower"):
        console.print("[red]error:[/red] --ray-address runs with --engine batched or flower")
        raise typer.Exit(2)
    batched = {
        k: v
        for k, v in {"chunk_size": chunk_size, "device": device, "rng": rng, "num_threads": threads}.items()
        if v is not None
    }
    if batched:
        base = {**base, "batched": {**base.get("batched", {}), **batched}}
    if dp_epsilon is not None:
        base = with_dp(base, dp_epsilon, dp_delta, dp_unit, dp_accountant)
    if data is not None:
        if engine == "flower":
            console.print("[red]error:[/red] --data runs with --engine loop or batched")
            raise typer.Exit(2)
        source = {"root": str(data), "layout": layout, "detector": detector}
        if split is not None:
            source["split_file"] = str(split)
        base = {**base, "data": {**base.get("data", {}), **source}}
    if pretrained is not None:
        base = {**base, "source_train": {**base.get("source_train", {}), "pretrained": str(pretrained)}}
    method_list = None
    if methods is not None:
        method_list = (
            method_names() if methods == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
        )
    profiles = list(PROFILES) if profile == "all" and data is None else [profile]
    for name in profiles:
        try:
            cfg = build_config(
                base,
                profile=name,
                seed=seed,
                methods=method_list,
                engine=engine,
                source_subjects=source_subjects,
                target_subjects=target_subjects,
            )
        except ValidationError as exc:
            raise fail(exc, code=2) from exc
        run_dir = out / name if len(profiles) > 1 else out
        try:
            if cfg.engine == "flower":
                from pft.simulations.flower_engine import run_flower_simulation

                result = run_flower_simulation(
                    cfg,
                    run_dir,
                    cache_dir,
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    ray_address=ray_address,
                    verbose=verbose,
                    log=console.print,
                )
            else:
                with stage_bars(progress) as bars:
                    result = run_experiment(
                        cfg,
                        run_dir,
                        cache_dir,
                        progress=bars,
                        log=lambda m: console.print(f"[yellow]{m}[/yellow]"),
                        ray_address=ray_address,
                    )
        except PFTError as exc:
            raise fail(exc) from exc
        typer.echo(result.summary())


def ablate(
    kinds: Annotated[
        list[str] | None,
        typer.Argument(help="Which: losses, pairing, dims, weights, branches (default: all of them)."),
    ] = None,
    profile: Annotated[str, typer.Option(help=f"Cohort profile: {', '.join(PROFILE_NAMES)}.")] = "biovid",
    seed: Annotated[int, typer.Option(help="Seed of the cohort and every stage.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder for ablation_<kind>.json/.md.")] = Path(
        "runs/ablations"
    ),
    config: Annotated[Path | None, typer.Option(help="JSON/YAML file of ExperimentConfig fields.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache root (as for pft simulate).")] = None,
) -> None:
    """The paper's ablations: loss terms, pairing, feature dimension, loss weights, identity vs expression.

    Each variant re-runs the evaluation of `pft simulate` (same cohort, caches and seeds) for PFT and
    source-only; `branches` measures feature similarity before and after each person's translator.
    """
    require_extra("ablate", "sim", "matplotlib", "sklearn")
    from pydantic import ValidationError

    from pft.core.resources import check_cache_root
    from pft.simulations.ablations import ABLATIONS, ablation_markdown, run_ablation
    from pft.simulations.workspace import default_cache_root

    chosen = kinds or list(ABLATIONS)
    unknown = [k for k in chosen if k not in ABLATIONS]
    if unknown:
        raise typer.BadParameter(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    try:
        check_cache_root(cache_dir if cache_dir is not None else default_cache_root())
        base = build_config(load_config_file(config), profile=profile, seed=seed)
    except (PFTError, ValidationError) as exc:
        raise fail(exc, code=2) from exc
    for kind in chosen:
        result = run_ablation(kind, base, out, cache_dir, log=lambda m: console.print(f"[dim]{m}[/dim]"))  # type: ignore[arg-type]
        typer.echo(f"\n## {kind}\n\n{ablation_markdown(result)}")
