"""``pft deploy``: run the deployment kit's Flower processes the way a service manager needs them.

A thin layer over :mod:`pft.server.supervise`. Registered by the main app as
``app.add_typer(deploy_app, name="deploy")``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from pft.core.errors import PFTError
from pft.server.supervise import HELPERS, require_helpers, supervise_supernode

__all__ = ["deploy_app"]

deploy_app = typer.Typer(
    help="Check a host's Flower helpers on PATH; run a site's SuperNode under supervision.",
    no_args_is_help=True,
)


class RoleChoice(StrEnum):
    """Which Flower process a host runs."""

    superlink = "superlink"
    superexec = "superexec"
    supernode = "supernode"


@deploy_app.command("check")
def check_command(
    role: Annotated[RoleChoice, typer.Argument(help="superlink, superexec or supernode.")],
) -> None:
    """Check that every helper ROLE starts by name is on PATH (exit 2 naming the missing ones)."""
    try:
        require_helpers(role.value)
    except PFTError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"{role.value}: {', '.join(HELPERS[role.value])} found on PATH")


@deploy_app.command("supernode", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def supernode_command(
    ctx: typer.Context,
    start_timeout: Annotated[
        float, typer.Option("--start-timeout", min=1, help="Seconds its executor may take to start.")
    ] = 60.0,
) -> None:
    """Run ``flower-supernode ARGS...`` (give them after ``--``); exit non-zero if it cannot run
    ClientApps: a helper missing from PATH (2), or its executor gone (3)."""
    try:
        code = supervise_supernode(
            list(ctx.args), start_timeout_s=start_timeout, log=lambda m: typer.secho(m, err=True)
        )
    except PFTError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    raise typer.Exit(code=code)
