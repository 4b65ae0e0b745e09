"""Which optional extra a command needs, and one clear line when it is missing.

The base install is the device SDK (docs/sdk.md); experiments, plots and Flower's engines come
with extras. A command that needs one checks for its packages before any work (a cheap
``find_spec``, nothing imported) and exits with code 1 naming what to install, instead of
failing deep inside a run with a traceback.
"""

from __future__ import annotations

import importlib.util

import typer

__all__ = ["require_extra"]


def require_extra(command: str, extra: str, *modules: str) -> None:
    """Exit with one line if any of ``modules`` (import names) is not installed.

    Raises
    ------
    typer.Exit
        Code 1, after ``error: `pft COMMAND` needs the EXTRA extra (...): pip install ...``.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        typer.secho(
            f"error: `pft {command}` needs the `{extra}` extra ({', '.join(missing)} not installed): "
            f"pip install 'sfda-pft[{extra}]'",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)
