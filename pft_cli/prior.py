"""`pft prior`: the opt-in federated translator prior (SecAgg+), as an experiment on a cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pft.cli.extras import require_extra
from pft.cli.progress import console
from pft.core.errors import PFTError

prior_app = typer.Typer(no_args_is_help=True)


@prior_app.callback()
def _needs_sim() -> None:
    """The opt-in federated translator prior (Flower SecAgg+, local DP): build it, score it."""
    require_extra("prior", "sim", "matplotlib", "sklearn", "skimage", "onnxruntime", "ray", "flwr")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated numbers expected", param_hint=option) from None
    if not values or any(v < 0 for v in values):
        raise typer.BadParameter("give at least one noise multiplier, each >= 0", param_hint=option)
    return values


@prior_app.command("run")
def run(
    out: Annotated[Path, typer.Option(help="Output folder (results.json, report.md, config.json).")] = Path(
        "runs/prior"
    ),
    profile: Annotated[str, typer.Option(help="Cohort profile (as `pft simulate`).")] = "biovid",
    seed: Annotated[int, typer.Option(help="Seed of the cohort and every stage.")] = 0,
    target_subjects: Annotated[
        int | None, typer.Option(help="Target subjects in the cohort (default: the profile's, 10).")
    ] = None,
    participants: Annotated[
        int, typer.Option(help="Target subjects that opt in and build the prior; the rest are held out.")
    ] = 6,
    noise: Annotated[
        str,
        typer.Option(
            help="Comma-separated noise multipliers sigma, one federation each (0 = no noise). "
            "The defaults give epsilon about 1, 4 and 8 per device (delta 1e-5, person)."
        ),
    ] = "4.0625,1.16,0.638,0",
    clip_norm: Annotated[
        float,
        typer.Option(help="L2 clip of each device's update (before noise); bias-only updates are ~1-2."),
    ] = 2.0,
    split_seed: Annotated[int, typer.Option(help="Seed of the participants / held-out split.")] = 0,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache root (default $PFT_CACHE_DIR or ~/.cache/pft).")
    ] = None,
) -> None:
    """Build the federated prior from opted-in subjects (Flower SecAgg+, local DP) and score PFT on
    held-out NEW subjects starting from the source T0 vs from each prior (docs/privacy.md)."""
    from pydantic import ValidationError

    from pft.simulations.experiment import ExperimentConfig
    from pft.simulations.prior_experiment import (
        PriorExperimentConfig,
        prior_report_markdown,
        run_prior_experiment,
    )

    try:
        config = PriorExperimentConfig(
            experiment=ExperimentConfig.model_validate(
                {
                    "profile": profile,
                    "seed": seed,
                    "target_subjects": target_subjects,
                    "embedding_plot": False,
                }
            ),
            participants=participants,
            noise_multipliers=_floats(noise, "--noise"),
            clip_norm=clip_norm,
            split_seed=split_seed,
        )
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        results = run_prior_experiment(config, out, cache_dir, log=lambda m: console.print(m))
    except (PFTError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    typer.echo(prior_report_markdown(results))
    typer.echo(f"wrote {out / 'results.json'} and {out / 'report.md'}")
