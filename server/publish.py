"""Publishing a model bundle: a copy with a new ``bundle_version``, its manifest, and a signature.

The server only ever sends SIGNED bundles; devices verify them against the publisher's public key
(``docs/security.md``). A version only goes up: devices refuse an older one (rollback).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import Array, ArrayRecord

from pft.core.errors import BundleError
from pft.core.signing import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    read_manifest,
    sign_bundle,
    verify_bundle,
    write_manifest_files,
)


def publish_bundle(
    source: str | Path, destination: str | Path, bundle_version: int, signing_key: Ed25519PrivateKey
) -> dict[str, Any]:
    """Copy the bundle at ``source`` to a new folder with ``bundle_version``, and sign it.

    Parameters
    ----------
    source:
        A bundle folder (``pft.core.bundle.save_bundle``); only the files its manifest lists are copied.
    destination:
        A folder that does not exist yet.
    bundle_version:
        The new release's version (a positive integer that must exceed what devices hold).
    signing_key:
        The publisher's Ed25519 key.

    Returns
    -------
    dict
        The signed manifest.
    """
    source, destination = Path(source), Path(destination)
    if bundle_version < 1:
        raise BundleError(f"bundle_version must be >= 1, got {bundle_version}")
    if destination.exists():
        raise BundleError(f"{destination} exists; publish each release into a new folder")
    manifest = read_manifest(source)
    destination.mkdir(parents=True)
    try:
        for name in sorted(manifest["files"]):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, destination / name)
        release = {k: v for k, v in manifest.items() if k != "files"}
        release["bundle_version"] = int(bundle_version)
        write_manifest_files(destination, release)
        sign_bundle(destination, signing_key)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    return verify_bundle(destination, signing_key.public_key())


def bundle_arrays(folder: str | Path, public_key: Ed25519PublicKey) -> tuple[ArrayRecord, dict[str, Any]]:
    """A verified bundle's files (manifest and signature included) as one uint8 ArrayRecord.

    Flower splits each Array into chunks of a few MB on the wire, so weights of any size travel.
    """
    folder = Path(folder)
    manifest = verify_bundle(folder, public_key)
    names = [*sorted(manifest["files"]), MANIFEST_NAME, SIGNATURE_NAME]
    arrays = {
        name: Array(np.frombuffer((folder / name).read_bytes(), dtype=np.uint8).copy()) for name in names
    }
    return ArrayRecord(arrays), manifest
