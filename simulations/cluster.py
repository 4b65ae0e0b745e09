"""Ray as the distributed engine: independent pieces of work run as Ray tasks on a cluster.

``--ray-address auto|HOST:PORT`` (``pft simulate --engine batched``, ``pft bench engines``,
``pft cohort make``, ``pft benchmark``) sends the pieces that do not depend on each other - the
batched engine's chunks, the cohort's subjects - to a running Ray cluster; without it everything
runs in this process as before (Ray is not imported).

:func:`run_tasks` is the one way work goes to the cluster:

- every piece is a Ray task with ``max_retries`` (a worker or node that dies mid-task is retried
  by Ray on another worker); results are **keyed by the piece's index**, so a retried piece is
  counted once, and they come back in input order whatever order the workers finish in;
- the same function runs on the worker as in-process, on the same inputs: for the batched engine a
  chunk is the same subjects as the in-process chunk, so the numbers are the in-process numbers
  (exact RNG mode; tests/test_ray_cluster.py checks it on a two-node cluster);
- at most ``2 x`` the cluster's CPUs pieces are in flight (the inputs of a piece are made when it
  is submitted), so memory stays bounded whatever the number of pieces;
- ``progress(done, total, report)`` runs on the driver as each piece finishes, with the node that
  ran it and its seconds there (:class:`PieceReport`): progress across the cluster.

Nodes need the same ``pft`` installed (the workers import it) and, for work that reads files by
path, the same files at the same path; docs/scale.md says what each command needs shared.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from pft.core.errors import ResourceError

__all__ = ["PieceReport", "check_ray_address", "ray_session", "run_tasks"]

R = TypeVar("R")

_ADDRESS = re.compile(r"^(auto|ray://[\w.\-]+:\d{1,5}|[\w.\-]+:\d{1,5})$")


def check_ray_address(address: str, option: str = "--ray-address") -> str:
    """``address`` if it is ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``.

    Raises
    ------
    ResourceError
        Anything else (checked before any work starts).
    """
    if not _ADDRESS.match(address):
        raise ResourceError(f"{option} must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    return address


@dataclass(frozen=True)
class PieceReport:
    """Where and how long one piece ran: its index, the Ray node id that ran it (first 12 hex
    digits), seconds on the worker, and the pickled size of its result (what came back through
    the object store)."""

    index: int
    node: str
    seconds: float
    result_bytes: int


@contextmanager
def ray_session(address: str, *, verbose: bool = False) -> Iterator[None]:
    """Connected to the Ray cluster at ``address`` for the block (a session already open in this
    process is reused and left open).

    Raises
    ------
    ResourceError
        No cluster answers at ``address``.
    """
    import ray

    check_ray_address(address)
    if ray.is_initialized():
        yield
        return
    try:
        with warnings.catch_warnings():
            if not verbose:  # Ray's tip about accelerator env vars, printed on every init
                warnings.simplefilter("ignore", FutureWarning)
            ray.init(
                address=address,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.WARNING,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ResourceError(f"--ray-address {address}: no Ray cluster there ({exc})") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _timed(fn: Callable[..., R]) -> Callable[..., tuple[R, str, float, int]]:
    """``fn`` wrapped to also return the node it ran on, its seconds and its result's size."""

    def piece(*args: Any) -> tuple[R, str, float, int]:
        import pickle

        import ray

        t0 = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - t0
        size = len(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        return out, ray.get_runtime_context().get_node_id()[:12], seconds, size

    piece.__name__ = getattr(fn, "__name__", "piece")
    piece.__qualname__ = getattr(fn, "__qualname__", "piece")
    return piece


def run_tasks(
    fn: Callable[..., R],
    pieces: Iterable[tuple[Any, ...]],
    *,
    total: int | None = None,
    retries: int = 3,
    num_cpus: float = 1,
    progress: Callable[[int, int, PieceReport], None] | None = None,
    each: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[fn(*args) for args in pieces]``, each call a Ray task on the connected cluster
    (:func:`ray_session`); results in input order.

    A task whose worker or node dies is retried up to ``retries`` times; its result is stored
    under its index, so a piece is never counted twice. An exception raised by ``fn`` itself is
    not retried (the same inputs would raise it again) and is raised here. ``ray.ObjectRef``
    arguments are resolved by Ray on the worker (use ``ray.put`` for what every piece shares).

    With ``each``, every result is handed to ``each(index, result)`` as it arrives (once per
    index) and not kept: the driver holds only the pieces in flight (returns ``[]``).
    """
    import ray

    remote = ray.remote(_timed(fn)).options(max_retries=retries, retry_exceptions=False, num_cpus=num_cpus)
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 1) / max(num_cpus, 1e-3)))
    source = enumerate(pieces)
    results: dict[int, R] = {}
    handed: set[int] = set()
    in_flight: dict[Any, int] = {}
    submitted = 0
    count = total
    while True:
        while len(in_flight) < window:
            item = next(source, None)
            if item is None:
                count = submitted if count is None else count
                break
            index, args = item
            in_flight[remote.remote(*args)] = index
            submitted += 1
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            index = in_flight.pop(ref)
            out, node, seconds, size = ray.get(ref)
            if index in results or index in handed:
                continue  # keyed by piece: one result per piece, retried or not
            if each is not None:
                each(index, out)
                handed.add(index)
            else:
                results[index] = out
            if progress is not None:
                done = len(results) + len(handed)
                progress(done, count or submitted, PieceReport(index, node, seconds, size))
    return [results[i] for i in range(len(results))]


# --- a local cluster of several raylets (tests, the scaling measurement) ----------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (our cluster's unique temp dir)."""
    from pathlib import Path

    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


@dataclass
class LocalCluster:
    """A Ray cluster of ``nodes`` raylets on 127.0.0.1, each started with ``ray start`` (the head
    with ``--head --port``, the others with ``--address``), ``cpus`` CPUs each, under one temp
    dir of its own. :meth:`stop` ends exactly these processes (never another cluster on the
    machine): SIGTERM to each ``ray start --block`` (which stops its node), then SIGKILL to
    whatever still names this cluster's temp dir."""

    nodes: int = 2
    cpus: int = 1
    timeout_s: float = 60.0
    address: str = ""
    _procs: list[Any] | None = None
    _temp: str = ""
    _log: Any = None

    def _ray_start(self, *where: str) -> None:
        """``ray start --block`` for one node (the venv's Ray: ``python -m ray.scripts.scripts``)."""
        import os
        import subprocess
        import sys

        assert self._procs is not None
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            f"--num-cpus={self.cpus}",
            f"--temp-dir={self._temp}",
            "--node-ip-address=127.0.0.1",
            *where,
        ]
        self._procs.append(
            subprocess.Popen(cmd, env=env, stdout=self._log, stderr=self._log, start_new_session=True)
        )

    def start(self) -> LocalCluster:
        import tempfile
        from pathlib import Path

        self._temp = tempfile.mkdtemp(prefix="pft-ray-", dir="/tmp")  # short: Ray's socket paths
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self._procs = []
        self._log = open(Path(self._temp) / "ray-start.log", "ab")  # noqa: SIM115 - closed in stop()
        try:
            for k in range(self.nodes):
                if k == 0:
                    self._ray_start("--head", f"--port={port}", "--include-dashboard=false")
                else:
                    self._ray_start(f"--address={self.address}")
                self._wait_for(k + 1)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for(self, alive: int) -> None:
        """Until ``alive`` nodes are up (a fresh driver asks the GCS), or ``timeout_s``."""
        import subprocess
        import sys

        probe = (
            "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            assert self._procs is not None
            dead = [p.returncode for p in self._procs if p.poll() is not None]
            if dead:
                raise ResourceError(f"ray start exited ({dead}); see {self._temp}/ray-start.log")
            try:
                out = subprocess.run(
                    [sys.executable, "-c", probe, self.address],
                    capture_output=True,
                    text=True,
                    timeout=max(5.0, deadline - time.monotonic()),
                )
                if out.returncode == 0 and int(out.stdout.strip().splitlines()[-1]) >= alive:
                    return
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                pass
            time.sleep(0.5)
        raise ResourceError(
            f"Ray cluster at {self.address}: {alive} node(s) not up in {self.timeout_s:.0f} s"
        )

    def add_node(self) -> None:
        """One more raylet joins the cluster."""
        assert self._procs is not None
        self._ray_start(f"--address={self.address}")
        self.nodes = len(self._procs)
        self._wait_for(self.nodes)

    def remove_node(self) -> None:
        """The last raylet added leaves (SIGTERM to its ``ray start --block``, which stops it)."""
        assert self._procs and len(self._procs) > 1, "the head stays"
        proc = self._procs.pop()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except Exception:
            with suppress(OSError):
                import os
                import signal

                os.killpg(proc.pid, signal.SIGKILL)
        self.nodes = len(self._procs)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self._alive() > self.nodes:
            time.sleep(0.5)

    def _alive(self) -> int:
        """Nodes the GCS counts alive (asked from a fresh driver process)."""
        import subprocess
        import sys

        probe = (
            "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, self.address], capture_output=True, text=True, timeout=60
        )
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return -1

    def stop(self) -> None:
        """End this cluster's processes (bounded: 20 s for a clean stop, then SIGKILL)."""
        import os
        import shutil
        import signal

        for proc in reversed(self._procs or []):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self._procs or []:
            with suppress(Exception):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self._procs or []:
            if proc.poll() is None:
                with suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if self._temp:
            for pid in _pids_mentioning(self._temp):
                if pid != os.getpid():
                    with suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._procs = []
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
