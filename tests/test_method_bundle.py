"""Model bundle: round trip with identical predictions; any modified file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pft.core.bundle import load_bundle, save_bundle
from pft.core.errors import BundleError, BundleTamperedError
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, StyleNormalizer, Translator
from pft.core.signing import generate_signing_key, sign_bundle, verify_bundle

CFG = ModelConfig(width=8, image_size=32, num_classes=3, translator_hidden=32)


def _write(folder: Path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    parts = {
        "extractor": FeatureExtractor(CFG).eval(),
        "classifier": Classifier(CFG).eval(),
        "translator": Translator(CFG).eval(),
    }
    torch.nn.init.normal_(parts["translator"].out.weight, std=0.1)
    norm = StyleNormalizer.fit(torch.randn(4, CFG.style_dim))
    styles = {"code/s0": torch.randn(CFG.style_dim), "neutral_mean/s0": torch.randn(CFG.pooled_dim)}
    path = save_bundle(
        folder,
        **parts,
        normalizer=norm,
        model_config=CFG,
        class_names=["neutral", "pain", "stress"],
        source_styles=styles,
        descriptors={"s0": np.arange(5, dtype=np.float64)},
        bundle_version=3,
        extra={"dataset": "synthetic"},
    )
    return path, {**parts, "normalizer": norm, "styles": styles}


def test_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    folder, orig = _write(tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "pft-bundle/1" and manifest["bundle_version"] == 3
    assert set(manifest["files"]) == {
        "F.safetensors",
        "C.safetensors",
        "T.safetensors",
        "styles.safetensors",
        "config.json",
    }
    b = load_bundle(folder)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    s1, s2 = torch.randn(CFG.style_dim), torch.randn(CFG.style_dim)
    with torch.no_grad():
        want = orig["classifier"](orig["translator"](orig["extractor"](x), s1, s2))
        got = b.classifier(b.translator(b.extractor(x), s1, s2))
    assert torch.equal(want, got)
    assert b.class_names == ["neutral", "pain", "stress"] and b.model_config == CFG
    assert torch.equal(b.normalizer.std, orig["normalizer"].std)
    assert torch.equal(b.source_styles["code/s0"], orig["styles"]["code/s0"])
    assert b.descriptors["s0"].tolist() == [0, 1, 2, 3, 4] and b.extra == {"dataset": "synthetic"}


@pytest.mark.parametrize("name", ["F.safetensors", "T.safetensors", "styles.safetensors", "config.json"])
def test_a_modified_file_is_refused(tmp_path: Path, name: str) -> None:
    folder, _ = _write(tmp_path / "b")
    data = bytearray((folder / name).read_bytes())
    data[-2] ^= 0x01  # flip one bit, same size
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(BundleTamperedError, match=name.replace(".", r"\.")):
        load_bundle(folder)


def test_missing_file_and_wrong_format_are_refused(tmp_path: Path) -> None:
    folder, _ = _write(tmp_path / "b")
    (folder / "C.safetensors").unlink()
    with pytest.raises(BundleTamperedError, match="missing"):
        load_bundle(folder)
    folder2, _ = _write(tmp_path / "c")
    manifest = json.loads((folder2 / "manifest.json").read_text())
    manifest["format"] = "other/9"
    (folder2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format"):
        load_bundle(folder2)


def test_signed_bundle_verifies_and_loads_from_the_verified_manifest(tmp_path: Path) -> None:
    folder, _ = _write(tmp_path / "b")
    key = generate_signing_key()
    sign_bundle(folder, key)
    manifest = verify_bundle(folder, key.public_key())
    assert load_bundle(folder, manifest=manifest).bundle_version == 3


def test_save_refuses_a_folder_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="refusing"):
        _write(tmp_path / "b")
