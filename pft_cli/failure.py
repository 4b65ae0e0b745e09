"""One clear line and a non-zero exit for every error a user can meet on the command line."""

from __future__ import annotations

import sys

import typer

__all__ = ["fail", "is_validation_error", "one_line"]


def is_validation_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a pydantic ``ValidationError`` (pydantic is not imported for this: an
    error can only be one once something has imported it, and `pft --help` loads no pydantic)."""
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(exc, pydantic.ValidationError)


def one_line(exc: BaseException) -> str:
    """The error as one line: a pydantic error names each field and what is wrong with it."""
    if is_validation_error(exc):
        parts = []
        for error in exc.errors():  # type: ignore[attr-defined]
            where = ".".join(str(p) for p in error["loc"]) or "config"
            parts.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
        return "invalid configuration: " + "; ".join(parts)
    return " ".join(str(exc).split())


def fail(exc: BaseException, code: int = 1) -> typer.Exit:
    """Print ``error: <one line>`` on stderr; return the :class:`typer.Exit` to raise."""
    typer.secho(f"error: {one_line(exc)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)
