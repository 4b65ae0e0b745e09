"""``pft client``: the on-device SDK from the command line (enroll, predict, export, info).

A thin layer over :mod:`pft.client.sdk`. The store key never appears on the command line in clear:
it comes from ``--passphrase-file``, ``--passphrase-env`` (a variable's name), ``--key-file``
(32 raw bytes / 64 hex digits from a keystore) or an interactive prompt.

Registered by the main app as ``app.add_typer(client_app, name="client")``.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from pft.cli.failure import fail
from pft.core.errors import PFTError

if TYPE_CHECKING:  # imported in the commands: `pft --help` loads no torch
    from pft.client.export import ExportFormat, InputDType
    from pft.client.sdk import Personalizer
    from pft.client.store import StoreKey

__all__ = ["client_app"]

client_app = typer.Typer(
    help="On-device personalisation: enroll a person, predict, export a mobile model.",
    no_args_is_help=True,
)

StateOption = Annotated[Path, typer.Option("--state", help="The device's state folder (bundles, store).")]
PublicKeyOption = Annotated[
    Path, typer.Option("--public-key", help="The publisher's bundle-verification key (PEM).")
]
BundleOption = Annotated[
    Path | None, typer.Option("--bundle", help="A received bundle folder to verify and install first.")
]
OwnerOption = Annotated[
    str,
    typer.Option(
        "--owner",
        help="The user id the personal state is bound to (required: with a shared default, one "
        "user's store copied into another's would decrypt as theirs).",
    ),
]
PassFileOption = Annotated[
    Path | None, typer.Option("--passphrase-file", help="File whose first line is the store passphrase.")
]
PassEnvOption = Annotated[
    str | None, typer.Option("--passphrase-env", help="Name of an environment variable holding it.")
]
MaybeOwnerOption = Annotated[
    str | None, typer.Option("--owner", help="The user id the personal state is bound to (with a key).")
]
KeyFileOption = Annotated[
    Path | None, typer.Option("--key-file", help="A raw 32-byte store key (platform keystore export).")
]


class FormatChoice(StrEnum):
    """Export formats."""

    onnx = "onnx"
    torchscript = "torchscript"


class DTypeChoice(StrEnum):
    """Input dtype of an exported model."""

    uint8 = "uint8"
    float32 = "float32"


def _store_key(
    passphrase_file: Path | None,
    passphrase_env: str | None,
    key_file: Path | None,
    *,
    prompt: bool = True,
    confirm: bool = False,
) -> StoreKey | None:
    """The store key from exactly one source; a hidden prompt when none is given and ``prompt``."""
    from pft.client.store import StoreKey

    given = [s for s in (passphrase_file, passphrase_env, key_file) if s is not None]
    if len(given) > 1:
        raise fail(ValueError("give one of --passphrase-file, --passphrase-env, --key-file"))
    try:
        if key_file is not None:
            return StoreKey.from_file(key_file)
        if passphrase_file is not None:
            try:
                lines = passphrase_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise fail(ValueError(f"{passphrase_file}: cannot read ({exc.strerror})")) from exc
            return StoreKey.from_passphrase(lines[0] if lines else "")
        if passphrase_env is not None:
            value = os.environ.get(passphrase_env, "")
            if not value:
                raise fail(ValueError(f"environment variable {passphrase_env} is empty or unset"))
            return StoreKey.from_passphrase(value)
    except PFTError as exc:
        raise fail(exc) from exc
    if not prompt:
        return None
    value = typer.prompt("store passphrase", hide_input=True, confirmation_prompt=confirm)
    return StoreKey.from_passphrase(value)


def _open(
    state: Path, public_key: Path, bundle: Path | None, key: StoreKey | None, owner: str | None
) -> Personalizer:
    """Install ``bundle`` if given, then load the saved state if there is one and a key."""
    from pft.client.personal_state import STATE_FILE
    from pft.client.sdk import Personalizer

    if key is not None and not owner:
        raise fail(ValueError("give --owner with a store key (the user id the state is bound to)"))
    if bundle is not None:
        Personalizer.from_bundle(bundle, public_key, state_dir=state).close()
    if key is not None and ((state / STATE_FILE).exists() or (state / f"{STATE_FILE}.prev").exists()):
        p = Personalizer.load(state, public_key, key, owner=str(owner))
        if p.recovered_from_backup:
            typer.secho(
                "warning: the personal state was damaged; the last good copy was loaded",
                fg=typer.colors.YELLOW,
                err=True,
            )
        return p
    return Personalizer.from_installed(state, public_key)


@client_app.command("enroll")
def enroll_command(
    videos: Annotated[list[Path], typer.Argument(help="Videos of the person's NEUTRAL face.")],
    state: StateOption,
    public_key: PublicKeyOption,
    owner: OwnerOption,
    bundle: BundleOption = None,
    passphrase_file: PassFileOption = None,
    passphrase_env: PassEnvOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Adapt the translator to one person on this device and save it encrypted in --state."""
    from pft.client.personal_state import STATE_FILE
    from pft.client.sdk import Personalizer

    key = _store_key(passphrase_file, passphrase_env, key_file, confirm=not (state / STATE_FILE).exists())
    try:
        if bundle is not None:
            p = Personalizer.from_bundle(bundle, public_key, state_dir=state, key=key, owner=owner)
        else:
            p = Personalizer.from_installed(state, public_key, key=key, owner=owner)
        with p:
            report = p.enroll(videos)
            path = p.save(key, owner=owner)
    except PFTError as exc:
        raise fail(exc) from exc
    for r in report.videos_rejected:
        typer.secho(f"skipped {r.path}: {r.reason}", fg=typer.colors.YELLOW, err=True)
    for warning in report.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    ood = f", out-of-distribution score {report.ood_score:.2f}" if report.ood_score is not None else ""
    typer.echo(
        f"enrolled from {len(report.videos_used)}/{report.videos_given} videos, {report.frames_used} "
        f"face frames, {report.iterations} iterations in {report.seconds:.1f} s "
        f"(reference {report.reference_subject}, pairing {report.pairing}{ood}); saved to {path}"
    )


@client_app.command("predict")
def predict_command(
    videos: Annotated[list[Path], typer.Argument(help="Videos to classify.")],
    state: StateOption,
    public_key: PublicKeyOption,
    owner: MaybeOwnerOption = None,
    bundle: BundleOption = None,
    passphrase_file: PassFileOption = None,
    passphrase_env: PassEnvOption = None,
    key_file: KeyFileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per video.")] = False,
) -> None:
    """Per-video labels (mean of per-frame probabilities); the source model if nobody is enrolled."""
    key = _store_key(passphrase_file, passphrase_env, key_file, prompt=False)
    failed = 0
    try:
        p = _open(state, public_key, bundle, key, owner)
    except PFTError as exc:
        raise fail(exc) from exc
    with p:
        for video in videos:
            try:
                pred = p.predict(video)
            except PFTError as exc:
                failed += 1
                typer.secho(f"{video}: {exc}", fg=typer.colors.RED, err=True)
                continue
            probs = {n: round(float(v), 4) for n, v in zip(pred.class_names, pred.smoothed, strict=True)}
            for warning in pred.warnings:
                typer.secho(f"warning: {video}: {warning}", fg=typer.colors.YELLOW, err=True)
            if as_json:
                record: dict[str, Any] = {
                    "video": str(video),
                    "label": pred.label,
                    "probabilities": probs,
                    "frames": len(pred.probabilities),
                    "personalized": pred.personalized,
                    "warnings": list(pred.warnings),
                }
                typer.echo(json.dumps(record))
            else:
                mode = "personalised" if pred.personalized else "source model"
                typer.echo(f"{video}: {pred.label} {probs} ({len(pred.probabilities)} frames, {mode})")
    if failed:
        raise typer.Exit(code=1)


@client_app.command("export")
def export_command(
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    state: StateOption,
    public_key: PublicKeyOption,
    owner: OwnerOption,
    fmt: Annotated[FormatChoice, typer.Option("--format", help="Model format.")] = FormatChoice.onnx,
    input_dtype: Annotated[
        DTypeChoice, typer.Option("--input-dtype", help="Input dtype of the exported graph.")
    ] = DTypeChoice.uint8,
    passphrase_file: PassFileOption = None,
    passphrase_env: PassEnvOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Write the personalised model (F, T, C fused, style codes baked in) for a mobile runtime."""
    from pft.client.sdk import Personalizer

    key = _store_key(passphrase_file, passphrase_env, key_file)
    try:
        if key is None:  # pragma: no cover - _store_key prompts
            raise PFTError("a store key is needed to export the personal model")
        with Personalizer.load(state, public_key, key, owner=owner) as p:
            path = p.export(
                out, cast("ExportFormat", fmt.value), input_dtype=cast("InputDType", input_dtype.value)
            )
    except PFTError as exc:
        raise fail(exc) from exc
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {fmt.value}, input {input_dtype.value})")


@client_app.command("info")
def info_command(
    state: StateOption,
    public_key: PublicKeyOption,
    owner: MaybeOwnerOption = None,
    passphrase_file: PassFileOption = None,
    passphrase_env: PassEnvOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """The installed bundle (version, digest, key id) and, with a key, the enrollment."""
    key = _store_key(passphrase_file, passphrase_env, key_file, prompt=False)
    try:
        with _open(state, public_key, None, key, owner) as p:
            typer.echo(json.dumps(p.info(), indent=2, sort_keys=True))
    except PFTError as exc:
        raise fail(exc) from exc
