"""The deployment kit without Docker (issue 19): Flower starts its helpers by name from PATH, so a
host whose PATH lacks them is refused before anything starts, and a SuperNode whose executor is
gone exits non-zero (so ``Restart=`` fires) instead of staying alive and useless."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_support import BIN, free_port
from typer.testing import CliRunner

from pft.cli.deploy import deploy_app
from pft.server.supervise import EXECUTOR_DIED, HELPERS, missing_helpers


def _partial_bin(tmp_path: Path, names: tuple[str, ...]) -> str:
    """A PATH folder holding only some of Flower's commands (links into this environment)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(BIN / name)
    return f"{folder}:/usr/bin:/bin"


def test_check_names_every_helper_missing_from_path(tmp_path: Path) -> None:
    path = _partial_bin(tmp_path, ("flower-supernode", "flower-superexec"))
    assert missing_helpers("supernode", path) == ["flwr-clientapp"]
    assert missing_helpers("superexec", "/usr/bin:/bin") == list(HELPERS["superexec"])
    runner = CliRunner()
    done = runner.invoke(deploy_app, ["check", "supernode"], env={"PATH": path})
    assert done.exit_code == 2 and "flwr-clientapp not found on PATH" in done.output
    done = runner.invoke(deploy_app, ["check", "superexec"], env={"PATH": f"{BIN}:/usr/bin:/bin"})
    assert done.exit_code == 0, done.output


def test_a_supernode_without_its_helpers_is_refused_before_it_starts(tmp_path: Path) -> None:
    path = _partial_bin(tmp_path, ("flower-supernode",))  # what a bare systemd PATH gives
    done = CliRunner().invoke(
        deploy_app, ["supernode", "--", "--insecure", "--superlink", "127.0.0.1:9"], env={"PATH": path}
    )
    assert done.exit_code == 2
    assert "flower-superexec, flwr-clientapp not found on PATH" in done.output


def _children(pid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid and name.encode() in cmd:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="supervision reads /proc (Linux)")
def test_a_supernode_whose_executor_dies_exits_non_zero(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:/usr/bin:/bin", "FLWR_HOME": str(tmp_path / "flwr")}
    command = [sys.executable, "-m", "pft.cli.main", "deploy", "supernode", "--start-timeout", "120", "--"]
    command += ["--insecure", "--superlink", f"127.0.0.1:{free_port()}", "--port", str(free_port())]
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            command, env=env, start_new_session=True, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while b"started its executor" not in log.read_bytes() and time.monotonic() < deadline:
            assert supervisor.poll() is None, log.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
        supernodes = _children(supervisor.pid, "flower-supernode")
        executor = [p for s in supernodes for p in _children(s, "flower-superexec")]
        assert executor, "the supervised SuperNode never started its executor"
        os.kill(executor[0], signal.SIGKILL)  # the executor dies (e.g. flwr-clientapp missing)
        assert supervisor.wait(timeout=60) == EXECUTOR_DIED
        assert b"stopping the SuperNode" in log.read_bytes()
        assert not _children(supervisor.pid, "flower-supernode")
    finally:
        for pid in [*_children(supervisor.pid, "flower-supernode")]:  # never leave a SuperNode behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait(timeout=10)


_TREE = r"""
import os, signal, subprocess, sys, time
pids = sys.argv[1]
# a child in the same process group that ignores SIGTERM (as a busy flwr-serverapp may)
stubborn = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
# a grandchild-like helper that left the group (its own session)
escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
with open(pids, "w") as f:
    f.write(f"{stubborn.pid} {escaped.pid}")
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the leader itself stops at once
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def test_stopping_a_process_stops_everything_it_started(tmp_path: Path) -> None:
    """The leader exits on SIGTERM, but a child ignoring SIGTERM and a child in its own session
    must not outlive the stop (the old teardown signalled the group once and left both)."""
    from pft.server.supervise import stop_process_tree

    pids = tmp_path / "pids"
    leader = subprocess.Popen([sys.executable, "-c", _TREE, str(pids)], start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (pids.is_file() and pids.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        children = [int(p) for p in pids.read_text().split()]
        time.sleep(0.3)  # the leader's SIGTERM handler is installed after the file is written
        stop_process_tree(leader, grace_s=1.0)
        assert leader.poll() is not None
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in children if not _gone(p)] == []
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
