"""Flower apps run through Flower's current runtime: ``flwr run`` against a SuperLink in simulation mode.

What :func:`run_flower_app` does, step by step (Flower 1.42):

1. writes a small Flower app folder (:func:`write_app`): a ``pyproject.toml`` whose
   ``[tool.flwr.app.components]`` name the ServerApp and ClientApp as importable ``module:attribute``
   and whose ``[tool.flwr.app.config]`` declares the run-config keys, plus a run-config TOML file
   with their values (passed as ``flwr run --run-config FILE``);
2. starts a SuperLink of its own (:class:`LocalSuperLink`): ``flower-superlink --insecure
   --simulation --isolation subprocess`` on 127.0.0.1 and a free port, with ``FLWR_HOME`` a fresh
   temp folder (its ``config.toml`` holds the one connection, its ``state.db`` and logs), runtime
   dependency installation off (the apps run in this install), and ``RAY_ADDRESS`` set when the
   run goes to a Ray cluster. This is the SuperLink ``flwr run`` would start for a ``:local:``
   connection, except that Flower's managed one is a detached per-user process on fixed ports
   (39091/39093) that outlives the command and would be shared with every other Flower run of the
   user;
3. ``flwr run APP CONNECTION --run-config FILE --federation-config "num-supernodes=N
   client-resources-num-cpus=C client-resources-num-gpus=G verbose=V"`` (plus
   ``init-args-num-cpus=R`` when the run's own Ray instance gets R CPUs) starts the run; ``flwr log
   RUN CONNECTION --stream`` waits for its end (its stream: Flower's own logs, into a file, or to
   the terminal with ``verbose``); ``flwr ls CONNECTION --run-id RUN`` gives its final status;
4. stops the SuperLink and every process under it (its SuperExec, the simulation process, the Ray
   instance that one started), also on failure or Ctrl-C, and removes ``FLWR_HOME``.

Every wait is bounded (:class:`FlowerRunSettings`) and ends in a :class:`FlowerRuntimeError` that
says what did not happen and shows the end of the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pydantic import Field, model_validator

from pft.core.config import FrozenConfig
from pft.core.errors import FlowerRuntimeError
from pft.server.supervise import descendants, stop_process_tree

__all__ = ["FlowerRunSettings", "LocalSuperLink", "flwr_cli", "run_flower_app", "write_app"]

BIN = Path(sys.executable).parent
CONNECTION = "pft-simulation"
APP_NAME = "pft-simulation"


class FlowerRunSettings(FrozenConfig):
    """The simulation federation of one run and its time limits."""

    num_supernodes: int = Field(ge=1)
    num_cpus: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0, le=1.0)
    #: a running Ray cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``); None: a Ray
    #: instance of the run's own on this machine
    ray_address: str | None = None
    #: CPUs of the run's own Ray instance (Flower's ``init-args-num-cpus``: at most that many
    #: ``num_cpus`` actors at a time); None: every core. Not with ``ray_address`` (a running
    #: cluster has its own CPUs)
    ray_num_cpus: int | None = Field(None, ge=1)
    #: Flower's own logs (DEBUG included) on the terminal instead of only in the log file
    verbose: bool = False
    start_timeout_s: float = Field(120.0, gt=0)
    run_timeout_s: float = Field(3600.0, gt=0)
    stop_timeout_s: float = Field(20.0, gt=0)

    @model_validator(mode="after")
    def _one_ray(self) -> FlowerRunSettings:
        if self.ray_address is not None and self.ray_num_cpus is not None:
            raise ValueError("ray_num_cpus sizes the run's own Ray instance: not with ray_address")
        return self


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, and json.dumps never writes ``\\/``)."""
    return json.dumps(value)


def write_app(folder: Path, serverapp: str, clientapp: str, run_config: Mapping[str, str]) -> Path:
    """A Flower app folder for ``flwr run`` and, beside it, the run-config file; returns that file.

    ``serverapp``/``clientapp``: importable ``module:attribute`` components; ``run_config``: the
    string values the apps read from ``context.run_config`` (declared with empty defaults in the
    app's ``[tool.flwr.app.config]``, given through ``--run-config``).
    """
    for name, ref in (("serverapp", serverapp), ("clientapp", clientapp)):
        module, _, attribute = ref.partition(":")
        if not module or not attribute:
            raise ValueError(f"{name} must be 'module:attribute', got {ref!r}")
    folder.mkdir(parents=True, exist_ok=True)
    declared = "\n".join(f"{key} = {_toml_string('')}" for key in sorted(run_config))
    (folder / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        f'name = "{APP_NAME}"\n'
        'version = "1.0.0"\n'
        'description = "pft simulate --engine flower: the SFDA-PFT federation as a Flower simulation"\n'
        'license = { file = "LICENSE" }\n'
        'dependencies = ["flwr>=1.42.0"]\n\n'
        "[tool.flwr.app]\n"
        'publisher = "sfda-pft"\n'
        "fab-format-version = 1\n"
        'flwr-version-target = "1.42.0"\n\n'
        "[tool.flwr.app.components]\n"
        f"serverapp = {_toml_string(serverapp)}\n"
        f"clientapp = {_toml_string(clientapp)}\n\n"
        "[tool.flwr.app.config]\n"
        f"{declared}\n"
    )
    # fab-format-version 1 wants the licence as a file
    (folder / "LICENSE").write_text("Generated for one pft simulate run; the project's licence applies.\n")
    (folder / "README.md").write_text(
        "# pft-simulation\n\nGenerated for one `pft simulate --engine flower` run.\n"
    )
    values = folder.parent / "run_config.toml"
    values.write_text("".join(f"{key} = {_toml_string(v)}\n" for key, v in sorted(run_config.items())))
    return values


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def flwr_cli(
    *args: str, env: Mapping[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """This install's ``flwr`` CLI with ``args`` in ``env`` (its ``FLWR_HOME`` names the
    connections) and ``cwd``; output captured as text. Raises ``subprocess.TimeoutExpired``."""
    return subprocess.run(
        [str(BIN / "flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )


class LocalSuperLink:
    """A SuperLink in simulation mode for one run: own ``FLWR_HOME`` (a temp folder), own free
    port, stopped with every process under it when the block ends (also on failure or Ctrl-C).

    ``python_path``: folders added to the apps' ``PYTHONPATH`` (components outside the install,
    e.g. a test's ClientApp); ``ray_address``: the Ray cluster the simulation joins.
    """

    def __init__(
        self,
        *,
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 20.0,
        ray_address: str | None = None,
        python_path: Sequence[Path] = (),
    ) -> None:
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.ray_address = ray_address
        self.python_path = tuple(Path(p) for p in python_path)
        self.home = Path()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tree: set[int] = set()

    @property
    def log_path(self) -> Path:
        """The SuperLink's own output (its log file, and what it and its children print)."""
        return self.home / "superlink.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the SuperLink (and so of the apps) and of every ``flwr`` command."""
        env = dict(os.environ)
        env.update(
            # Flower starts its helpers (flower-superexec, flwr-simulation) by name: this install's
            PATH=os.pathsep.join([str(BIN), *filter(None, [env.get("PATH")])]),
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        )
        env["PYTHONUNBUFFERED"] = "1"  # the log shows what happened up to a failure
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.python_path:
            paths = [str(p.resolve()) for p in self.python_path]
            env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
        if self.ray_address is not None:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink and wait (at most ``start_timeout_s``) until it answers ``/health``.

        Raises
        ------
        FlowerRuntimeError
            It exited (three tries: a free port can be taken between choosing and binding it) or
            did not answer in time; everything it started is stopped.
        """
        self.home = Path(tempfile.mkdtemp(prefix="pft-flwr-home-"))
        os.chmod(self.home, 0o700)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            for _attempt in range(3):
                if self._start_once(deadline):
                    return
            raise FlowerRuntimeError(
                f"flower-superlink exited at start three times; its log:\n{_tail(self.log_path)}"
            )
        except BaseException:
            self.stop()
            raise

    def _start_once(self, deadline: float) -> bool:
        self.port = _free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        command = [
            str(BIN / "flower-superlink"),
            "--insecure", "--simulation",
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.home / "state.db"),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self._tree.add(self.process.pid)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise FlowerRuntimeError(
            f"flower-superlink did not answer on 127.0.0.1:{self.port} within {self.start_timeout_s:.0f} s; "
            f"its log:\n{_tail(self.log_path)}"
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink (:func:`flwr_cli`)."""
        try:
            return flwr_cli(*args, env=self.env, cwd=self.home, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise FlowerRuntimeError(
                f"flwr {' '.join(args[:1])} did not return within {timeout:.0f} s"
            ) from exc

    def remember_tree(self) -> None:
        """Note the processes now under the SuperLink (stopped with it, even once reparented)."""
        if self.process is not None:
            self._tree.update(descendants(self.process.pid))

    def stop(self) -> None:
        """SIGTERM to the SuperLink and every process under it (those seen during the run too),
        SIGKILL to what is left after ``stop_timeout_s`` (:func:`pft.server.supervise.stop_process_tree`);
        then ``FLWR_HOME`` is removed. Safe to call twice."""
        if self.process is not None:
            self.remember_tree()
            stop_process_tree(self.process, self.stop_timeout_s, known=self._tree)
            self.process = None
        self._tree = set()
        if self.home != Path() and self.home.is_dir():
            shutil.rmtree(self.home, ignore_errors=True)


def _federation_config(settings: FlowerRunSettings) -> str:
    items = [
        f"num-supernodes={settings.num_supernodes}",
        f"client-resources-num-cpus={settings.num_cpus}",
        f"client-resources-num-gpus={float(settings.num_gpus)}",
        f"verbose={'true' if settings.verbose else 'false'}",
    ]
    if settings.ray_num_cpus is not None:
        items.append(f"init-args-num-cpus={settings.ray_num_cpus}")
    return " ".join(items)


def run_flower_app(
    serverapp: str,
    clientapp: str,
    run_config: Mapping[str, str],
    settings: FlowerRunSettings,
    *,
    log_file: Path,
    python_path: Sequence[Path] = (),
) -> int:
    """Run a ServerApp and a ClientApp as a Flower simulation through ``flwr run``; returns the run id.

    ``log_file``: where Flower's log stream of the run goes (also shown with ``settings.verbose``).

    Raises
    ------
    FlowerRuntimeError
        The SuperLink did not start, ``flwr run`` refused the run, or the run did not finish as
        ``finished:completed`` within ``settings.run_timeout_s`` (the message says which).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with LocalSuperLink(
        start_timeout_s=settings.start_timeout_s,
        stop_timeout_s=settings.stop_timeout_s,
        ray_address=settings.ray_address,
        python_path=python_path,
    ) as link:
        app = link.home / "app"
        values = write_app(app, serverapp, clientapp, run_config)
        started = link.flwr(
            "run", str(app), CONNECTION,
            "--run-config", str(values),
            "--federation-config", _federation_config(settings),
            "--format", "json",
        )  # fmt: skip
        try:
            run_id = int(json.loads(started.stdout)["run-id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FlowerRuntimeError(
                f"flwr run did not start the run (exit {started.returncode}): "
                f"{(started.stdout + started.stderr).strip()[-2000:]}"
            ) from exc
        _wait_for_run(link, run_id, settings, log_file)
        status, details = _run_status(link, run_id)
        if status != "finished:completed":
            raise FlowerRuntimeError(
                f"Flower run {run_id} ended {status}: {details}\n"
                f"end of its log ({log_file}):\n{_tail(log_file)}"
            )
        return run_id


def _wait_for_run(link: LocalSuperLink, run_id: int, settings: FlowerRunSettings, log_file: Path) -> None:
    """``flwr log RUN --stream`` into ``log_file`` until the run ends (at most
    ``settings.run_timeout_s``); with ``settings.verbose`` what it writes is echoed here too."""
    command = [str(BIN / "flwr"), "log", str(run_id), CONNECTION, "--stream"]
    with log_file.open("wb") as sink:
        stream = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=link.env,
            cwd=link.home,
            start_new_session=True,
        )
    shown = 0
    try:
        deadline = time.monotonic() + settings.run_timeout_s
        while stream.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            link.remember_tree()
            if settings.verbose:
                shown = _echo(log_file, shown)
        if settings.verbose:
            _echo(log_file, shown)
        if stream.poll() is None:
            raise FlowerRuntimeError(
                f"Flower run {run_id} did not end within {settings.run_timeout_s:.0f} s; "
                f"end of its log ({log_file}):\n{_tail(log_file)}"
            )
    finally:
        if stream.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(stream.pid, signal.SIGKILL)
        stream.wait()


def _echo(path: Path, offset: int) -> int:
    """Write what ``path`` holds past ``offset`` to stdout; returns the new offset."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def _run_status(link: LocalSuperLink, run_id: int) -> tuple[str, str]:
    """``(status, details)`` of the run as ``flwr ls --run-id`` reports it; waits (bounded) for the
    status to leave running: the log stream can end a moment before the status is written."""
    deadline = time.monotonic() + 30
    status, details = "unknown", ""
    while True:
        listed = link.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            run = json.loads(listed.stdout)["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details", ""))
        except (ValueError, KeyError, IndexError, TypeError):
            details = (listed.stdout + listed.stderr).strip()[-2000:]
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(0.5)
