"""The server audit log (pft.server.audit) and the `pft server` commands that write it."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pft.cli.server import server_app
from pft.core.signing import (
    bundle_digest,
    key_id,
    load_public_key,
    verify_bundle,
    write_manifest_files,
    write_signing_key_pair,
)
from pft.server.audit import AuditLog, AuditLogError, RunAudit, read_audit_log, verify_audit_log
from pft.server.rounds import Exchange


def test_append_and_read_back(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    first = log.append("bundle.published", version=3, digest="ab" * 32, dir=tmp_path, nodes={2, 1})
    log.append("run.finished", run_id=7, status="failed", reason="QuorumError: x")
    raw = log.path.read_bytes()
    assert raw.count(b"\n") == 2 and raw.endswith(b"\n")
    read = read_audit_log(log.path)
    assert read.torn_lines == []
    assert read.events[0] == first
    assert first["dir"] == str(tmp_path) and first["nodes"] == [1, 2]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["ts"])
    assert read.of("run.finished", status="failed")[0]["run_id"] == 7
    assert read.of("run.finished", status="completed") == []
    assert oct(log.path.stat().st_mode & 0o777) == "0o640"


def test_torn_last_line_is_skipped_and_closed_by_the_next_append(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("a", n=1)
    with log.path.open("ab") as handle:  # a writer killed mid-line
        handle.write(b'{"ts":"2026-01-01T00:00:00.000000Z","event":"b","n":')
    read = read_audit_log(log.path)
    assert [e["n"] for e in read.events] == [1] and read.torn_lines == [2]
    log.append("c", n=3)  # starts on a fresh line; the torn one stays, never rewritten
    read = read_audit_log(log.path)
    assert [e["event"] for e in read.events] == ["a", "c"] and read.torn_lines == [2]


def test_an_altered_middle_line_is_an_error(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for n in range(3):
        log.append("e", n=n)
    lines = log.path.read_text().splitlines()
    lines[1] = lines[1].replace('"n":1', '"n":1,}')  # complete line, not JSON
    log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError, match="line 2"):
        read_audit_log(log.path)
    assert read_audit_log(tmp_path / "missing.jsonl").events == []


def test_nan_and_bad_event_names(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.append("m", value=float("nan"))["value"] == "nan"  # stays valid JSON
    with pytest.raises(AuditLogError):
        log.append("two\nlines")
    with pytest.raises(AuditLogError, match="cannot append"):
        AuditLog(tmp_path / "audit.jsonl" / "below-a-file").append("x")


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path))
    for n in range(count):
        log.append("w", worker=worker, n=n, pad="x" * 3000)


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w, 40)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    read = read_audit_log(path)
    assert read.torn_lines == [] and len(read.events) == 120
    for w in range(3):
        assert [e["n"] for e in read.events if e["worker"] == w] == list(range(40))


def test_run_audit_records_an_exchange(tmp_path: Path) -> None:
    outcome = Exchange("train", replies={5: {"adapt-iterations": 3.0}}, failures={9: "no reply within 30 s"})
    outcome.seconds = 1.23456
    RunAudit(AuditLog(tmp_path / "a.jsonl"), 42).exchange(2, outcome)
    RunAudit(None, 42).exchange(2, outcome)  # no log configured: nothing written, no error
    (event,) = read_audit_log(tmp_path / "a.jsonl").events
    assert event["run_id"] == 42 and event["round"] == 2 and event["type"] == "train"
    assert event["asked"] == [5, 9] and event["replied"] == [5]
    assert event["failures"] == {"9": "no reply within 30 s"} and event["seconds"] == 1.235


def test_pft_server_publish_audits_the_release(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a bundle folder: payload files + manifest (signed or not)
    source.mkdir()
    (source / "classes.json").write_text('["neutral", "pain"]')
    (source / "weights.bin").write_bytes(bytes(range(256)))
    write_manifest_files(source, {"format": "test", "bundle_version": 1})
    signing, public = write_signing_key_pair(tmp_path / "keys")
    audit = tmp_path / "audit.jsonl"
    runner = CliRunner()
    args = ["publish", "--source", str(source), "--out", str(tmp_path / "v2"), "--version", "2"]
    args += ["--signing-key", str(signing), "--audit-log", str(audit)]
    done = runner.invoke(server_app, args)
    assert done.exit_code == 0, done.output
    manifest = verify_bundle(tmp_path / "v2", load_public_key(public))
    assert manifest["bundle_version"] == 2
    (event,) = read_audit_log(audit).events
    assert event["event"] == "bundle.published" and event["version"] == 2
    assert event["digest"] == bundle_digest(manifest) and event["key_id"] == key_id(load_public_key(public))
    # publishing into an existing folder fails, and nothing is audited
    again = runner.invoke(server_app, args)
    assert again.exit_code == 1 and "exists" in again.output
    assert len(read_audit_log(audit).events) == 1
    shown = runner.invoke(server_app, ["audit", "--audit-log", str(audit), "--event", "bundle.published"])
    assert json.loads(shown.output.strip())["digest"] == event["digest"]
    assert os.stat(tmp_path / "v2" / "manifest.json").st_size > 0


# --- tamper evidence: a hash chain and an anchor (issue 19) --------------------------------------
def _log_with(tmp_path: Path, n: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("run.started", run_id=1)
    for k in range(n - 2):
        log.append("exchange", run_id=1, round=k, failures={})
    log.append("run.finished", run_id=1, status="failed", reason="QuorumError: 1 node")
    return log


def _verify(log: AuditLog) -> list[str]:
    return verify_audit_log(log.path).problems


def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    log = _log_with(tmp_path)
    checked = verify_audit_log(log.path)
    assert checked.ok and checked.records == 4
    lines = log.path.read_bytes().split(b"\n")[:-1]
    assert checked.head == hashlib.sha256(lines[-1]).hexdigest()  # oracle: the last line's hash
    assert json.loads(lines[1])["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert json.loads((tmp_path / "audit.jsonl.head").read_text())["seq"] == 3
    done = CliRunner().invoke(server_app, ["audit", "--audit-log", str(log.path), "--verify"])
    assert done.exit_code == 0 and "verified 4 record(s)" in done.output


def test_a_failed_run_edited_to_completed_is_detected(tmp_path: Path) -> None:
    log = _log_with(tmp_path)
    text = log.path.read_text().replace('"status":"failed"', '"status":"completed"')
    log.path.write_text(text)
    assert any("edited" in p for p in _verify(log))
    done = CliRunner().invoke(server_app, ["audit", "--audit-log", str(log.path), "--verify"])
    assert done.exit_code == 1 and "NOT verified" in done.output


def test_a_middle_line_edited_or_removed_is_detected(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 5)
    lines = log.path.read_text().splitlines(keepends=True)
    log.path.write_text("".join([*lines[:2], lines[2].replace('"round":1', '"round":7'), *lines[3:]]))
    assert any("line 4" in p and "edited" in p for p in _verify(log))
    log.path.write_text("".join(lines[:2] + lines[3:]))
    assert any("seq" in p for p in _verify(log))


def test_the_deleted_last_line_is_detected_by_the_anchor(tmp_path: Path) -> None:
    log = _log_with(tmp_path)
    lines = log.path.read_text().splitlines(keepends=True)
    log.path.write_text("".join(lines[:-1]))  # the run.finished line removed: the chain alone holds
    assert any("removed from the end" in p for p in _verify(log))
    (tmp_path / "audit.jsonl.head").unlink()  # and the anchor deleted too
    assert any("no anchor" in p for p in _verify(log))


def test_a_torn_line_from_a_crash_still_verifies(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 2)
    with log.path.open("ab") as handle:  # a writer killed mid-line
        handle.write(b'{"ts":"2026-01-01T00:00:00.000000Z","event":"b","n":')
    log.append("after", n=1)  # chains from the last whole record
    checked = verify_audit_log(log.path)
    assert checked.ok and checked.records == 3, checked.problems
