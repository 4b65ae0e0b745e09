"""Key and certificate tooling (pft.server.pki and the `pft keys` / `pft certs` commands)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from pft.cli.keys import certs_app, keys_app
from pft.core import signing
from pft.server import pki

SANS = ["127.0.0.1", "localhost", "myhost.example"]


@pytest.fixture()
def deployment(tmp_path: Path) -> tuple[pki.CAFiles, pki.ServerCertificateFiles]:
    ca = pki.create_ca(tmp_path / "ca")
    server = pki.issue_server_certificate(tmp_path / "ca", tmp_path / "server", SANS)
    return ca, server


def test_server_certificate_is_issued_by_the_ca_with_sans(
    deployment: tuple[pki.CAFiles, pki.ServerCertificateFiles],
) -> None:
    ca_files, server_files = deployment
    ca = pki.load_certificate(ca_files.cert)
    cert = pki.load_certificate(server_files.cert)
    cert.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)  # self-signed root
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "myhost.example"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    key = serialization.load_pem_private_key(server_files.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    for private in (ca_files.key, server_files.key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert server_files.ca_cert.read_bytes() == ca_files.cert.read_bytes()


def test_certificate_from_another_ca_does_not_verify(
    tmp_path: Path, deployment: tuple[pki.CAFiles, pki.ServerCertificateFiles]
) -> None:
    other = pki.load_certificate(pki.create_ca(tmp_path / "other").cert)
    cert = pki.load_certificate(deployment[1].cert)
    with pytest.raises(InvalidSignature):  # same subject name, different key
        cert.verify_directly_issued_by(other)


def test_rotate_keeps_the_old_pair_and_the_sans(
    tmp_path: Path, deployment: tuple[pki.CAFiles, pki.ServerCertificateFiles]
) -> None:
    ca_files, server_files = deployment
    old_cert_bytes, old_key_bytes = server_files.cert.read_bytes(), server_files.key.read_bytes()
    new = pki.rotate_server_certificate(tmp_path / "ca", tmp_path / "server")
    assert (tmp_path / "server" / "server.pem.old").read_bytes() == old_cert_bytes
    assert (tmp_path / "server" / "server.key.old").read_bytes() == old_key_bytes
    cert = pki.load_certificate(new.cert)
    assert new.cert.read_bytes() != old_cert_bytes
    cert.verify_directly_issued_by(pki.load_certificate(ca_files.cert))
    assert pki.certificate_sans(cert) == SANS
    assert stat.S_IMODE(new.key.stat().st_mode) == 0o600
    assert not list((tmp_path / "server").glob("*.new"))


def test_refusals(tmp_path: Path, deployment: tuple[pki.CAFiles, pki.ServerCertificateFiles]) -> None:
    with pytest.raises(pki.PKIError, match="already exists"):
        pki.create_ca(tmp_path / "ca")
    with pytest.raises(pki.PKIError, match="already exists"):
        pki.issue_server_certificate(tmp_path / "ca", tmp_path / "server", SANS)
    with pytest.raises(pki.PKIError, match="at least one"):
        pki.issue_server_certificate(tmp_path / "ca", tmp_path / "s2", [])
    with pytest.raises(pki.PKIError, match="neither an IP"):
        pki.issue_server_certificate(tmp_path / "ca", tmp_path / "s3", ["bad host name!"])
    with pytest.raises(pki.PKIError, match="node name"):
        pki.create_node_key_pair(tmp_path, "../escape")


def test_node_keys_load_the_way_flower_loads_them(tmp_path: Path) -> None:
    files = pki.create_node_key_pair(tmp_path, "supernode-01")
    public = serialization.load_ssh_public_key(files.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert files.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    # the exact function flower-supernode runs on --auth-supernode-private-key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(
        auth_supernode_private_key=str(files.private_key), auth_supernode_public_key=None
    )
    result = _try_setup_client_authentication(args)
    assert result is not None
    assert result[1] == public
    # and the one `flwr supernode register KEY.pub` runs
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(files.public_key)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_node_keys_match_ssh_keygen(tmp_path: Path) -> None:
    files = pki.create_node_key_pair(tmp_path, "n1")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(files.private_key)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert derived == files.public_key.read_text().split()[:2]
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(files.public_key)], capture_output=True, text=True, check=True
    ).stdout
    assert fingerprint.startswith("384 ") and "(ECDSA)" in fingerprint


def test_cli_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(keys_app, ["signing", "--out", str(tmp_path / "sign")])
    assert result.exit_code == 0, result.output
    key = signing.load_signing_key(tmp_path / "sign" / "bundle-signing.key")
    assert signing.key_id(key.public_key()) in result.output
    again = runner.invoke(keys_app, ["signing", "--out", str(tmp_path / "sign")])
    assert again.exit_code == 1 and "already exists" in again.output
    assert runner.invoke(keys_app, ["node", "--out", str(tmp_path / "n"), "--name", "sn1"]).exit_code == 0
    assert (tmp_path / "n" / "sn1.pub").exists()
    assert runner.invoke(certs_app, ["ca", "--out", str(tmp_path / "ca")]).exit_code == 0
    args = ["server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv")]
    result = runner.invoke(certs_app, [*args, "--san", "127.0.0.1", "--san", "localhost"])
    assert result.exit_code == 0, result.output
    assert "127.0.0.1, localhost" in result.output
    result = runner.invoke(
        certs_app, ["rotate", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "srv" / "server.pem.old").exists()
    assert runner.invoke(
        certs_app, ["server", "--ca", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    ).exit_code


def test_store_key_command_never_replaces_a_key_without_force(tmp_path: Path) -> None:
    """Issue 19: the documented one-liner silently replaced a site's store key (orphaning its stores)."""
    runner = CliRunner()
    path = tmp_path / "etc" / "store.key"
    result = runner.invoke(keys_app, ["store", "--out", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    key = path.read_bytes()
    again = runner.invoke(keys_app, ["store", "--out", str(path)])
    assert again.exit_code == 1 and "refusing to replace a store key" in again.output
    assert path.read_bytes() == key
    forced = runner.invoke(keys_app, ["store", "--out", str(path), "--force"])
    assert forced.exit_code == 0 and path.read_bytes() != key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("flower-superlink") is None
    and not Path(sys.executable).with_name("flower-superlink").exists(),
    reason="flwr is not installed",
)
def test_superlink_serves_tls_with_our_certificates(
    tmp_path: Path, deployment: tuple[pki.CAFiles, pki.ServerCertificateFiles]
) -> None:
    _, server = deployment
    port = _free_port()
    exe = Path(sys.executable).with_name("flower-superlink")
    command = [
        str(exe) if exe.exists() else "flower-superlink",
        "--ssl-ca-certfile", str(server.ca_cert),
        "--ssl-certfile", str(server.cert),
        "--ssl-keyfile", str(server.key),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    log = (tmp_path / "superlink.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        context = ssl.create_default_context(cafile=str(server.ca_cert))
        deadline, peer = time.monotonic() + 25, None
        while peer is None and time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "superlink.log").read_text()
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
                    context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
                ):
                    peer = tls.getpeercert()
            except (ConnectionRefusedError, TimeoutError):
                time.sleep(0.3)
        assert peer is not None, "the SuperLink never accepted a TLS connection"
        assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        # a client that does not trust our CA is refused by its own verification
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.1")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the SuperLink and the SuperExec it started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
