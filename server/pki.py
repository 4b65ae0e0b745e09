"""Keys and certificates for a Flower deployment: a CA, SuperLink TLS certificates, SuperNode keys.

- :func:`create_ca` writes a self-signed root (``ca.key`` 0600, ``ca.crt``).
- :func:`issue_server_certificate` writes a SuperLink certificate signed by that CA
  (``server.key`` 0600, ``server.pem``) with IP and DNS subject alternative names and the
  serverAuth extended key usage; :func:`rotate_server_certificate` issues a fresh one and keeps
  the previous pair as ``.old``. Pass them to ``flower-superlink --ssl-ca-certfile ca.crt
  --ssl-certfile server.pem --ssl-keyfile server.key`` and give SuperNodes ``--root-certificates
  ca.crt``.
- :func:`create_node_key_pair` writes a SuperNode authentication key pair as ``ssh-keygen -t ecdsa
  -b 384`` does: an EC P-384 private key in OpenSSH PEM (what ``flower-supernode
  --auth-supernode-private-key`` reads with ``load_ssh_private_key``) and an OpenSSH public key
  line (what ``flwr supernode register KEY.pub`` reads with ``load_ssh_public_key``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pft.core.atomic import atomic_write_bytes
from pft.core.errors import PFTError

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "SERVER_CERT_NAME",
    "SERVER_KEY_NAME",
    "CAFiles",
    "NodeKeyFiles",
    "PKIError",
    "ServerCertificateFiles",
    "certificate_sans",
    "create_ca",
    "create_node_key_pair",
    "issue_server_certificate",
    "load_certificate",
    "rotate_server_certificate",
]

CA_KEY_NAME, CA_CERT_NAME = "ca.key", "ca.crt"
SERVER_KEY_NAME, SERVER_CERT_NAME = "server.key", "server.pem"
_CURVE = ec.SECP384R1
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PKIError(PFTError):
    """Key or certificate material is missing, malformed, or would be overwritten."""


@dataclass(frozen=True)
class CAFiles:
    """Where a CA lives: its private key and its self-signed certificate."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class ServerCertificateFiles:
    """A SuperLink's TLS key and certificate, and the CA certificate that verifies it."""

    key: Path
    cert: Path
    ca_cert: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode authentication key pair (OpenSSH formats)."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    atomic_write_bytes(path, data)  # created 0600 by mkstemp
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise PKIError(f"{path} already exists; refusing to replace key material (use rotate or --force)")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read a PEM certificate.

    Raises
    ------
    PKIError
        If the file is missing or not a PEM certificate.
    """
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PKIError(f"{path}: cannot read the certificate ({exc.strerror})") from exc
    except ValueError as exc:
        raise PKIError(f"{path}: not a PEM certificate ({exc})") from exc


def _load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert = load_certificate(ca_dir / CA_CERT_NAME)
    try:
        key = serialization.load_pem_private_key((ca_dir / CA_KEY_NAME).read_bytes(), password=None)
    except OSError as exc:
        raise PKIError(f"{ca_dir / CA_KEY_NAME}: cannot read the CA key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{ca_dir / CA_KEY_NAME}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{ca_dir / CA_KEY_NAME}: the CA key must be an EC key")
    if key.public_key() != cert.public_key():
        raise PKIError(f"{ca_dir}: {CA_KEY_NAME} does not belong to {CA_CERT_NAME}")
    return key, cert


def create_ca(
    out_dir: str | Path,
    *,
    common_name: str = "PFT deployment root CA",
    valid_days: int = 3650,
    overwrite: bool = False,
) -> CAFiles:
    """Create a self-signed EC P-384 certificate authority (``ca.key`` 0600, ``ca.crt``).

    Parameters
    ----------
    out_dir:
        Folder for the two files (created if missing).
    common_name:
        The CA's subject CN.
    valid_days:
        Validity from now.
    overwrite:
        Replace an existing CA (otherwise :class:`PKIError`).

    Returns
    -------
    CAFiles
        The written paths.
    """
    out = Path(out_dir)
    files = CAFiles(key=out / CA_KEY_NAME, cert=out / CA_CERT_NAME)
    _refuse_overwrite([files.key, files.cert], overwrite)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(files.key, key, serialization.PrivateFormat.PKCS8)
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _general_names(sans: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        san = san.strip()
        if not san:
            raise PKIError("an empty subject alternative name was given")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            if not re.fullmatch(
                r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*",
                san,
            ):
                raise PKIError(f"{san!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(san))
    return names


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """The subject alternative names of a certificate, IPs and DNS names as strings (in order)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in ext if isinstance(name, x509.IPAddress | x509.DNSName)]


def issue_server_certificate(
    ca_dir: str | Path,
    out_dir: str | Path,
    sans: list[str],
    *,
    common_name: str | None = None,
    valid_days: int = 365,
    overwrite: bool = False,
) -> ServerCertificateFiles:
    """Issue a SuperLink TLS certificate signed by the CA in ``ca_dir``.

    Parameters
    ----------
    ca_dir:
        Folder with ``ca.key`` and ``ca.crt`` (see :func:`create_ca`).
    out_dir:
        Folder for ``server.key`` (0600) and ``server.pem``; ``ca.crt`` is copied beside them.
    sans:
        Subject alternative names: IP addresses become IPAddress entries, names DNSName entries.
    common_name:
        Subject CN (default: the first SAN).
    valid_days:
        Validity from now (capped by the CA's own expiry).
    overwrite:
        Replace an existing pair (otherwise :class:`PKIError`; see :func:`rotate_server_certificate`).

    Returns
    -------
    ServerCertificateFiles
        The written paths.
    """
    if not sans:
        raise PKIError("a server certificate needs at least one --san (IP address or DNS name)")
    ca_key, ca_cert = _load_ca(Path(ca_dir))
    out = Path(out_dir)
    files = ServerCertificateFiles(
        key=out / SERVER_KEY_NAME, cert=out / SERVER_CERT_NAME, ca_cert=out / CA_CERT_NAME
    )
    _refuse_overwrite([files.key, files.cert], overwrite)
    cert, key = _build_server_certificate(ca_key, ca_cert, sans, common_name, valid_days)
    _write_private(files.key, key, serialization.PrivateFormat.PKCS8)
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    if files.ca_cert.resolve() != (Path(ca_dir) / CA_CERT_NAME).resolve():
        _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def _build_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: list[str],
    common_name: str | None,
    valid_days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(_CURVE())
    now = _now()
    not_after = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or sans[0])])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def rotate_server_certificate(
    ca_dir: str | Path, out_dir: str | Path, sans: list[str] | None = None, *, valid_days: int = 365
) -> ServerCertificateFiles:
    """Issue a new server key and certificate from the same CA, keeping the old pair as ``.old``.

    Parameters
    ----------
    ca_dir:
        The CA folder.
    out_dir:
        The folder holding the current ``server.key``/``server.pem``.
    sans:
        New SANs; default: those of the current certificate.
    valid_days:
        Validity of the new certificate.

    Returns
    -------
    ServerCertificateFiles
        The paths of the new pair (the old one is at ``server.key.old``/``server.pem.old``).
    """
    out = Path(out_dir)
    key_path, cert_path = out / SERVER_KEY_NAME, out / SERVER_CERT_NAME
    old = load_certificate(cert_path)
    names = sans or certificate_sans(old)
    ca_key, ca_cert = _load_ca(Path(ca_dir))
    cn_attrs = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(cn_attrs[0].value) if cn_attrs else None
    cert, key = _build_server_certificate(ca_key, ca_cert, names, common_name, valid_days)
    # Write the new pair beside, then swap: at every moment a complete pair exists on disk.
    new_key, new_cert = out / (SERVER_KEY_NAME + ".new"), out / (SERVER_CERT_NAME + ".new")
    _write_private(new_key, key, serialization.PrivateFormat.PKCS8)
    _write_public(new_cert, cert.public_bytes(serialization.Encoding.PEM))
    os.replace(key_path, out / (SERVER_KEY_NAME + ".old"))
    os.replace(cert_path, out / (SERVER_CERT_NAME + ".old"))
    os.replace(new_key, key_path)
    os.replace(new_cert, cert_path)
    return ServerCertificateFiles(key=key_path, cert=cert_path, ca_cert=out / CA_CERT_NAME)


def create_node_key_pair(out_dir: str | Path, name: str, *, overwrite: bool = False) -> NodeKeyFiles:
    """Create a SuperNode authentication key pair, as ``ssh-keygen -t ecdsa -b 384 -f NAME`` would.

    Parameters
    ----------
    out_dir:
        Folder for ``NAME`` (private key, OpenSSH PEM, 0600) and ``NAME.pub`` (OpenSSH line).
    name:
        File name and key comment (letters, digits, ``._-``).
    overwrite:
        Replace an existing pair (otherwise :class:`PKIError`).

    Returns
    -------
    NodeKeyFiles
        The written paths. Register the public key with ``flwr supernode register NAME.pub``.
    """
    if not _NODE_NAME.match(name):
        raise PKIError(f"node name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    out = Path(out_dir)
    files = NodeKeyFiles(private_key=out / name, public_key=out / f"{name}.pub")
    _refuse_overwrite([files.private_key, files.public_key], overwrite)
    key = ec.generate_private_key(_CURVE())
    _write_private(files.private_key, key, serialization.PrivateFormat.OpenSSH)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(files.public_key, line + f" {name}\n".encode())
    return files
