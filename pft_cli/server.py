"""``pft server``: operator commands for a deployment (publish a bundle, register a site, audit log).

A thin layer over :mod:`pft.server.publish`, ``flwr supernode register`` and :mod:`pft.server.audit`;
every state-changing command appends an event to the audit log (``--audit-log``).
Registered by the main app as ``app.add_typer(server_app, name="server")``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from pft.cli.failure import fail
from pft.cli.secrets import passphrase_from_env
from pft.core.errors import PFTError

__all__ = ["server_app"]

server_app = typer.Typer(
    help="Operate a deployment: publish signed bundles, register sites, read the audit log.",
    no_args_is_help=True,
)

AuditOption = Annotated[
    Path, typer.Option("--audit-log", help="The server's audit log (JSON lines, append-only).")
]


@server_app.command("publish")
def publish_command(
    source: Annotated[Path, typer.Option("--source", help="The bundle folder to release.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the signed release.")],
    version: Annotated[int, typer.Option("--version", min=1, help="bundle_version; only goes up.")],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="bundle-signing.key (PEM).")],
    audit_log: AuditOption,
    passphrase_env: Annotated[
        str | None, typer.Option("--passphrase-env", help="Env variable holding the key's passphrase.")
    ] = None,
) -> None:
    """Copy a bundle into a new folder with VERSION, sign it, and audit the release."""
    from pft.core.signing import bundle_digest, key_id, load_signing_key
    from pft.server.audit import AuditLog
    from pft.server.publish import publish_bundle

    try:
        passphrase = passphrase_from_env(passphrase_env)
    except ValueError as exc:
        raise fail(exc) from exc
    try:
        key = load_signing_key(signing_key, passphrase)
        manifest = publish_bundle(source, out, version, key)
        digest = bundle_digest(manifest)
        AuditLog(audit_log).append(
            "bundle.published",
            version=version,
            digest=digest,
            key_id=key_id(key.public_key()),
            dir=out.resolve(),
            files=len(manifest["files"]),
        )
    except (PFTError, OSError, ValueError) as exc:
        raise fail(exc) from exc
    typer.echo(f"published bundle v{version} -> {out}  (digest {digest})")


def _flwr() -> str:
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise fail(FileNotFoundError("the `flwr` command is not installed"))
    return found


@server_app.command("register-node")
def register_node_command(
    public_key: Annotated[Path, typer.Argument(help="The site's NAME.pub (from `pft keys node`).")],
    connection: Annotated[str, typer.Argument(help="The flwr connection ($FLWR_HOME/config.toml).")],
    audit_log: AuditOption,
) -> None:
    """Register a site's public key with the SuperLink (``flwr supernode register``) and audit it."""
    from pft.server.audit import AuditLog

    try:
        line = public_key.read_bytes()
    except OSError as exc:
        raise fail(exc) from exc
    done = subprocess.run(
        [_flwr(), "supernode", "register", str(public_key), connection],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    typer.echo(done.stdout.strip())
    if done.returncode != 0:
        raise fail(RuntimeError(f"flwr supernode register failed: {done.stderr.strip()}"))
    try:
        AuditLog(audit_log).append(
            "node.registered",
            name=public_key.name.removesuffix(".pub"),
            public_key_sha256=hashlib.sha256(line.strip()).hexdigest(),
            connection=connection,
        )
    except PFTError as exc:
        raise fail(exc) from exc


@server_app.command("audit")
def audit_command(
    audit_log: AuditOption,
    event: Annotated[str | None, typer.Option("--event", help="Only this event, e.g. run.finished.")] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check the hash chain and the anchor (<log>.head) instead of printing: exit 1 if "
            "a line was edited, removed or added without the anchor.",
        ),
    ] = False,
    anchor: Annotated[
        Path | None, typer.Option("--anchor", help="The log's anchor, if not <log>.head beside it.")
    ] = None,
) -> None:
    """Print the audit log's events as JSON lines (a torn last line is reported, not printed)."""
    from pft.server.audit import AuditLogError, read_audit_log, verify_audit_log

    if verify:
        checked = verify_audit_log(audit_log, anchor)
        if not checked.ok:
            raise fail(AuditLogError(f"{audit_log}: NOT verified: {'; '.join(checked.problems)}"))
        typer.echo(f"{audit_log}: verified {checked.records} record(s); head {checked.head}")
        return
    try:
        read = read_audit_log(audit_log)
    except PFTError as exc:
        raise fail(exc) from exc
    for record in read.events:
        if event is None or record["event"] == event:
            typer.echo(json.dumps(record))
    if read.torn_lines:
        typer.secho(f"torn line(s) skipped: {read.torn_lines}", fg=typer.colors.YELLOW, err=True)
