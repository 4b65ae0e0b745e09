"""``pft client``: enroll, predict, export and info end to end; the passphrase never on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sdk_support import SdkWorld, shared_world
from typer.testing import CliRunner

from pft.cli.client import client_app

runner = CliRunner()


@pytest.fixture()
def world(tmp_path_factory: pytest.TempPathFactory) -> SdkWorld:
    return shared_world(tmp_path_factory)


@pytest.mark.slow
def test_enroll_predict_export_info(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    secret = tmp_path / "passphrase.txt"
    secret.write_text("open sesame\n")
    common = ["--state", str(state), "--public-key", str(world.public_pem), "--owner", "alice"]
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    videos = [str(v) for v in world.target_videos("adapt")]
    res = runner.invoke(
        client_app,
        [
            "enroll",
            *common,
            "--bundle",
            str(world.bundle_v1),
            "--passphrase-file",
            str(secret),
            *videos,
            str(bad),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "enrolled from 2/3 videos, 16 face frames" in res.output
    assert "skipped" in res.output and "bad.mp4" in res.output
    assert (state / "personal.store").is_file()

    probe = str(world.target_videos("eval")[0])
    res = runner.invoke(
        client_app,
        ["predict", *common, "--passphrase-env", "PFT_TEST_PASS", "--json", probe],
        env={"PFT_TEST_PASS": "open sesame"},
    )
    assert res.exit_code == 0, res.output
    record = json.loads(res.output.strip().splitlines()[-1])
    assert record["personalized"] is True and record["label"] in {"neutral", "pain"}
    assert abs(sum(record["probabilities"].values()) - 1.0) < 1e-3

    out = tmp_path / "model.onnx"
    res = runner.invoke(client_app, ["export", *common, "--passphrase-file", str(secret), "--out", str(out)])
    assert res.exit_code == 0, res.output
    crops = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    (probs,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": crops})
    assert probs.shape == (2, 2)

    res = runner.invoke(client_app, ["info", *common, "--passphrase-file", str(secret)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert (
        info["enrolled"] is True and info["bundle_version"] == 1 and info["enrollment"]["frames_used"] == 16
    )
    assert "open sesame" not in res.output

    # a wrong passphrase: a clear error, exit code 1, nothing overwritten
    before = (state / "personal.store").read_bytes()
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("guess")
    res = runner.invoke(client_app, ["enroll", *common, "--passphrase-file", str(wrong), *videos])
    assert res.exit_code == 1 and "wrong passphrase or key" in res.output
    assert (state / "personal.store").read_bytes() == before


def test_no_passphrase_option_and_one_key_source(world: SdkWorld, tmp_path: Path) -> None:
    common = ["--state", str(tmp_path / "s"), "--public-key", str(world.public_pem)]
    res = runner.invoke(client_app, ["enroll", *common, "--passphrase", "in clear", "x.mp4"])
    assert res.exit_code != 0 and "No such option" in res.output
    key = tmp_path / "k.txt"
    key.write_text("x")
    res = runner.invoke(
        client_app,
        ["enroll", *common, "--owner", "u", "--passphrase-file", str(key), "--passphrase-env", "X", "x.mp4"],
    )
    assert res.exit_code == 1 and "give one of" in res.output
    res = runner.invoke(client_app, ["info", *common])
    assert res.exit_code == 1 and "no bundle installed" in res.output


def test_the_owner_is_never_a_shared_default(world: SdkWorld, tmp_path: Path) -> None:
    """Issue 19: with a default owner and a shared site key, one user's store copied into another's
    decrypted as theirs. The owner must be named; a key without an owner is refused."""
    common = ["--state", str(tmp_path / "s"), "--public-key", str(world.public_pem)]
    key = tmp_path / "k.txt"
    key.write_text("x")
    res = runner.invoke(client_app, ["enroll", *common, "--passphrase-file", str(key), "x.mp4"])
    assert res.exit_code == 2 and "--owner" in res.output
    res = runner.invoke(client_app, ["export", *common, "--passphrase-file", str(key), "--out", "m.onnx"])
    assert res.exit_code == 2 and "--owner" in res.output
    res = runner.invoke(client_app, ["info", *common, "--passphrase-file", str(key)])
    assert res.exit_code == 1 and "give --owner" in res.output
