"""``pft keys`` and ``pft certs``: key and certificate tooling for bundle signing and Flower deployments.

A thin layer: every command parses its options and calls :mod:`pft.core.signing` or
:mod:`pft.server.pki`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pft.cli.failure import fail
from pft.cli.secrets import passphrase_from_env
from pft.core.errors import PFTError

if TYPE_CHECKING:  # imported in the commands: `pft --help` loads no cryptography
    from pft.server.pki import ServerCertificateFiles

__all__ = ["certs_app", "keys_app"]

keys_app = typer.Typer(
    help="Create keys: bundle signing, SuperNode authentication, a site's store key.", no_args_is_help=True
)
certs_app = typer.Typer(
    help="A CA and SuperLink TLS certificates for a Flower deployment.", no_args_is_help=True
)

OutDir = Annotated[Path, typer.Option("--out", help="Folder to write into (created if missing).")]
Force = Annotated[bool, typer.Option("--force", help="Replace existing key material.")]


@keys_app.command("signing")
def signing_command(
    out: OutDir,
    passphrase_env: Annotated[
        str | None,
        typer.Option(
            "--passphrase-env", help="Encrypt the private key with the passphrase in this env variable."
        ),
    ] = None,
    force: Force = False,
) -> None:
    """Create the bundle-signing key pair: bundle-signing.key (0600) and bundle-signing.pub."""
    from pft.core.signing import key_id, load_public_key, write_signing_key_pair

    try:
        passphrase = passphrase_from_env(passphrase_env)
    except ValueError as exc:
        raise fail(exc) from exc
    try:
        key_path, pub_path = write_signing_key_pair(out, passphrase, overwrite=force)
    except (PFTError, FileExistsError) as exc:
        raise fail(exc) from exc
    typer.echo(f"private key: {key_path}  (keep it secret, off the devices)")
    typer.echo(f"public key:  {pub_path}  (ship it to devices; key id {key_id(load_public_key(pub_path))})")


@keys_app.command("node")
def node_command(
    out: OutDir,
    name: Annotated[str, typer.Option("--name", help="Key file name and comment, e.g. supernode-01.")],
    force: Force = False,
) -> None:
    """Create a SuperNode authentication key pair (EC P-384, OpenSSH formats, like ssh-keygen)."""
    from pft.server import pki

    try:
        files = pki.create_node_key_pair(out, name, overwrite=force)
    except PFTError as exc:
        raise fail(exc) from exc
    typer.echo(f"private key: {files.private_key}  (flower-supernode --auth-supernode-private-key)")
    typer.echo(
        f"public key:  {files.public_key}  (flwr supernode register {files.public_key.name} CONNECTION)"
    )


@keys_app.command("store")
def store_command(
    out: Annotated[Path, typer.Option("--out", help="The key file to write, e.g. /etc/pft/store.key.")],
    force: Force = False,
) -> None:
    """Create a raw store key (32 random bytes, 0600) where no platform keystore provides one.

    It encrypts every person's state on the site: an existing key is never replaced without
    --force (that would make every store it encrypts unreadable).
    """
    from pft.client.store import generate_key_file

    try:
        path = generate_key_file(out, overwrite=force)
    except (FileExistsError, OSError) as exc:
        raise fail(exc) from exc
    typer.echo(f"store key: {path}  (0600; back it up with the site's stores - they are useless without it)")


@certs_app.command("ca")
def ca_command(
    out: OutDir,
    common_name: Annotated[
        str, typer.Option("--cn", help="The CA's common name.")
    ] = "PFT deployment root CA",
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 3650,
    force: Force = False,
) -> None:
    """Create a certificate authority: ca.key (0600) and ca.crt."""
    from pft.server import pki

    try:
        files = pki.create_ca(out, common_name=common_name, valid_days=days, overwrite=force)
    except PFTError as exc:
        raise fail(exc) from exc
    typer.echo(f"CA key:         {files.key}  (keep it offline)")
    typer.echo(f"CA certificate: {files.cert}  (--ssl-ca-certfile / --root-certificates)")


SanOption = Annotated[
    list[str] | None,
    typer.Option("--san", help="Subject alternative name (repeat): an IP address or a DNS name."),
]
CaDir = Annotated[Path, typer.Option("--ca", help="Folder holding ca.key and ca.crt.")]
Days = Annotated[int, typer.Option("--days", min=1, help="Validity in days.")]


@certs_app.command("server")
def server_command(
    ca: CaDir, out: OutDir, san: SanOption = None, days: Days = 365, force: Force = False
) -> None:
    """Issue a SuperLink TLS certificate signed by the CA: server.key (0600), server.pem, ca.crt."""
    from pft.server import pki

    try:
        files = pki.issue_server_certificate(ca, out, san or [], valid_days=days, overwrite=force)
    except PFTError as exc:
        raise fail(exc) from exc
    _print_server(files)


@certs_app.command("rotate")
def rotate_command(ca: CaDir, out: OutDir, san: SanOption = None, days: Days = 365) -> None:
    """Issue a new server certificate from the same CA; the old pair is kept as .old."""
    from pft.server import pki

    try:
        files = pki.rotate_server_certificate(ca, out, san or None, valid_days=days)
    except PFTError as exc:
        raise fail(exc) from exc
    _print_server(files)
    typer.echo(
        "previous pair kept as server.key.old / server.pem.old; restart the SuperLink to use the new one"
    )


def _print_server(files: ServerCertificateFiles) -> None:
    from pft.server import pki

    cert = pki.load_certificate(files.cert)
    typer.echo(f"server key:  {files.key}")
    typer.echo(f"server cert: {files.cert}  (SANs: {', '.join(pki.certificate_sans(cert))})")
    typer.echo(f"valid until: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    typer.echo(
        f"flower-superlink --ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.cert} "
        f"--ssl-keyfile {files.key}"
    )
