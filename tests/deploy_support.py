"""A local Flower deployment for tests: SuperLink (TLS, node auth, optional ``--database`` and a
separate SuperExec), SuperNodes and the ``flwr`` CLI on 127.0.0.1 with free ports.

Every process runs in its own session and is stopped by PID (its process group) in
:meth:`Deployment.stop`, also on failure; every wait has a timeout. Used by
``tests/test_flower_deployment.py`` and ``tests/test_deploy_*.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pft.server import pki
from pft.server.supervise import stop_process_tree
from pft.simulations.flower_runtime import flwr_cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "e2e"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Deployment:
    """Processes of one local deployment, all stopped by PID in :meth:`stop`.

    ``database``: a file for ``flower-superlink --database`` (None: in memory).
    ``isolation``: ``"subprocess"`` (the SuperLink starts its own SuperExec) or ``"process"``
    (the deployment kit's layout: a separate ``flower-superexec`` runs the ServerApp).
    """

    root: Path
    ca: pki.CAFiles
    server: pki.ServerCertificateFiles
    port: int = field(default_factory=free_port)
    database: Path | None = None
    isolation: str = "subprocess"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process: own FLWR_HOME, runtime dependency installation off."""
        env = {k: v for k, v in os.environ.items() if k != "PFT_FLOWER_SPEC"}
        env.update(FLWR_HOME=str(self.root / "flwr-home"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        return env

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own session, output to ``root/<name>.log``."""
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=self.root
        )
        log.close()
        self.processes[name] = process
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line of the runbook (docs/deploy.md)."""
        command = [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(self.server.ca_cert),
            "--ssl-certfile", str(self.server.cert),
            "--ssl-keyfile", str(self.server.key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation", self.isolation,
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        if self.database is not None:
            command += ["--database", str(self.database)]
        return command

    def start_superlink(self, name: str = "superlink", timeout: float = 90) -> None:
        """Write the ``flwr`` connection, start the SuperLink, wait until it serves TLS."""
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.ca.cert}"\n'
        )
        self.start(name, self.superlink_command())
        self.wait_tls(name, timeout)

    def wait_tls(self, name: str = "superlink", timeout: float = 90) -> float:
        """Wait until the SuperLink accepts a TLS connection; returns the seconds waited."""
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.processes[name].poll() is None, self.log(name)
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock,
                    context.wrap_socket(sock, server_hostname="127.0.0.1"),
                ):
                    return time.monotonic() - t0
            except (ConnectionRefusedError, TimeoutError, ssl.SSLError, OSError):
                time.sleep(0.2)
        raise TimeoutError("the SuperLink never accepted a TLS connection")

    def start_superexec(self, name: str = "superexec") -> subprocess.Popen[bytes]:
        """The separate SuperExec that runs ServerApps (``--isolation process``), over TLS."""
        return self.start(
            name,
            [
                str(BIN / "flower-superexec"),
                "--runtime-api-address", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.ca.cert),
                "--executor", "subprocess",
            ],
        )  # fmt: skip

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's FLWR_HOME."""
        return flwr_cli(*args, env=self.env, cwd=self.root, timeout=timeout)

    def register(self, public_key: Path) -> None:
        """``flwr supernode register KEY.pub CONNECTION`` (fails the test on error)."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION)
        assert done.returncode == 0, done.stdout + done.stderr

    def start_supernode(
        self,
        name: str,
        key: pki.NodeKeyFiles,
        node_config: str,
        *,
        ca_cert: Path | None = None,
        retries: int = 0,
        max_wait_s: float = 15,
        supervised: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a SuperNode with TLS and node authentication (``retries`` 0: retry forever).

        ``supervised``: as the kit runs a site, ``pft deploy supernode -- ARGS`` (exits non-zero
        when its executor cannot run ClientApps) instead of ``flower-supernode ARGS``.
        """
        arguments = [
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(ca_cert or self.ca.cert),
            "--auth-supernode-private-key", str(key.private_key),
            "--node-config", node_config,
            "--port", str(free_port()),
        ]  # fmt: skip
        if retries:
            arguments += ["--max-retries", str(retries), "--max-wait-time", str(max_wait_s)]
        if supervised:
            return self.start(name, [str(BIN / "pft"), "deploy", "supernode", "--", *arguments])
        return self.start(name, [str(BIN / "flower-supernode"), *arguments])

    def start_run(self, spec: Path) -> int:
        """``flwr run REPO CONNECTION --run-config pft-spec=...``; returns the run id."""
        started = self.flwr(
            "run", str(REPO), CONNECTION, "--run-config", f'pft-spec="{spec}"', "--format", "json"
        )
        assert started.returncode == 0, started.stdout + started.stderr
        return int(json.loads(started.stdout)["run-id"])

    def runs(self) -> list[dict[str, object]]:
        """``flwr ls CONNECTION --format json``'s runs."""
        listed = self.flwr("ls", CONNECTION, "--format", "json")
        try:
            return list(json.loads(listed.stdout).get("runs", []))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"flwr ls: {listed.stdout} {listed.stderr}") from exc

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        for run in self.runs():
            if int(str(run["run-id"])) == run_id:
                return str(run["status"])
        raise AssertionError(f"run {run_id} not listed")

    def wait_run(self, run_id: int, timeout: float, log: str = "superlink") -> str:
        """Poll ``flwr ls`` until the run is finished; raise TimeoutError after ``timeout`` s.

        The tests' timeouts are bounds on a hang, not speed targets: with the suite on two workers a
        deployment run shares the 2 cores with a Ray simulation (a killed node's rounds wait out
        their round timeout), so they leave a wide margin over the ~90-120 s such a run takes."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(1)
        raise TimeoutError(f"run {run_id} still {status!r} after {timeout} s\n{self.log(log)[-3000:]}")

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and its children (its process group); wait for it."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process this deployment started and every process they started (the
        SuperExec's ``flwr-serverapp`` too), by process group and /proc descendants."""
        for process in self.started:
            stop_process_tree(process)
