"""One clear line and a non-zero exit for every error a user can meet on the command line."""

from __future__ import annotations

import typer
from pydantic import ValidationError

__all__ = ["fail", "one_line"]


def one_line(exc: BaseException) -> str:
    """The error as one line: a pydantic error names each field and what is wrong with it."""
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "config"
            parts.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
        return "invalid configuration: " + "; ".join(parts)
    return " ".join(str(exc).split())


def fail(exc: BaseException, code: int = 1) -> typer.Exit:
    """Print ``error: <one line>`` on stderr; return the :class:`typer.Exit` to raise."""
    typer.secho(f"error: {one_line(exc)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)
