"""Reading secrets for the CLI without putting them on the command line."""

from __future__ import annotations

import os


def passphrase_from_env(variable: str | None) -> bytes | None:
    """The passphrase held in environment variable ``variable`` (None when no variable is named).

    Raises
    ------
    ValueError
        The variable is named but unset or empty.
    """
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"environment variable {variable} is empty or unset")
    return value.encode("utf-8")
