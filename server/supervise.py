"""Flower's processes as services: their helpers on PATH, and a SuperNode that fails loudly.

Flower starts its helpers BY NAME from ``PATH``: a SuperLink or SuperNode starts
``flower-superexec``, which starts ``flwr-serverapp`` / ``flwr-clientapp`` for every run. With a
service manager's bare ``PATH`` (a systemd unit calling ``/opt/pft/venv/bin/flower-*`` by absolute
path) the helper is not found: the SuperExec crashes on its first task, the run stays pending, and
a SuperNode whose executor died stays alive but useless, so ``Restart=`` never fires.

- :func:`missing_helpers` / ``pft deploy check ROLE``: every helper a role needs resolves on
  ``PATH`` (run it as the unit's ``ExecStartPre``, or before starting by hand);
- :func:`supervise_supernode` / ``pft deploy supernode -- ARGS``: runs ``flower-supernode ARGS``
  after that check and exits non-zero as soon as its executor (the ``flower-superexec`` child it
  starts) is gone, so the service manager restarts the site. It reads ``/proc`` (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from pft.core.errors import PFTError

__all__ = [
    "EXECUTOR_DIED",
    "HELPERS",
    "DeploymentSetupError",
    "Role",
    "descendants",
    "missing_helpers",
    "process_state",
    "require_helpers",
    "stop_process_tree",
    "supervise_supernode",
]

Role = Literal["superlink", "superexec", "supernode"]

#: The executables each role starts (itself first), all looked up by name on PATH by Flower. The
#: kit's SuperLink runs ``--isolation process`` (the SuperExec is a service of its own); with the
#: default ``--isolation subprocess`` it also starts ``flower-superexec``: check ``superexec`` too.
HELPERS: dict[str, tuple[str, ...]] = {
    "superlink": ("flower-superlink",),
    "superexec": ("flower-superexec", "flwr-serverapp"),
    "supernode": ("flower-supernode", "flower-superexec", "flwr-clientapp"),
}

#: Exit status of :func:`supervise_supernode` when the SuperNode's executor is gone.
EXECUTOR_DIED = 3


class DeploymentSetupError(PFTError):
    """A Flower helper is not on PATH, or a supervised process cannot do its job."""


def missing_helpers(role: Role, path: str | None = None) -> list[str]:
    """The helpers of ``role`` that do not resolve on ``path`` (default ``$PATH``)."""
    search = os.environ.get("PATH", "") if path is None else path
    return [name for name in HELPERS[role] if shutil.which(name, path=search) is None]


def require_helpers(role: Role, path: str | None = None) -> None:
    """Raise :class:`DeploymentSetupError` naming every helper of ``role`` missing from PATH."""
    missing = missing_helpers(role, path)
    if missing:
        search = os.environ.get("PATH", "") if path is None else path
        raise DeploymentSetupError(
            f"{', '.join(missing)} not found on PATH ({search or 'empty'}): Flower starts its helpers "
            "by name; put the venv's bin folder first on PATH (systemd: Environment=PATH=...)"
        )


def process_state(pid: int) -> tuple[int, str, str] | None:
    """``(parent pid, state, command line)`` of a live process (None when it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces or ')'
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[0], cmdline


def _executors(supernode_pid: int) -> list[int]:
    """The live ``flower-superexec`` children of the SuperNode (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = process_state(int(entry.name))
            if state is not None and state[0] == supernode_pid and "flower-superexec" in state[2]:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (its stat only: reading a command line can fail briefly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def supervise_supernode(
    arguments: Sequence[str],
    *,
    start_timeout_s: float = 60.0,
    poll_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> int:
    """Run ``flower-supernode *arguments`` and return the exit status it should end with.

    The helpers are checked first (:func:`require_helpers`). Then the SuperNode runs as a child in
    its own process group: if it exits, its status is returned (a clean exit of a SuperNode that
    was not asked to stop is still a failure); if its ``flower-superexec`` child does not appear
    within ``start_timeout_s`` or disappears later, the SuperNode is stopped and
    :data:`EXECUTOR_DIED` is returned. SIGTERM/SIGINT are passed on (a requested stop returns 0).

    Raises
    ------
    DeploymentSetupError
        A helper is missing from PATH (nothing was started).
    """
    require_helpers("supernode")
    binary = shutil.which("flower-supernode")
    assert binary is not None
    process = subprocess.Popen([binary, *arguments], start_new_session=True, preexec_fn=_die_with_parent)
    stop_requested = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        started = time.monotonic()
        executor: int | None = None
        missing_since: float | None = None
        while True:
            code = process.poll()
            if code is not None:
                if stop_requested:
                    return 0
                log(f"flower-supernode exited with status {code}")
                return code if code != 0 else EXECUTOR_DIED
            now = time.monotonic()
            if executor is None or not _alive(executor):
                current = _executors(process.pid)
                if current:
                    if executor is None:
                        log(f"flower-supernode (pid {process.pid}) started its executor flower-superexec")
                    executor, missing_since = current[0], None
                elif executor is not None and missing_since is None:
                    missing_since = now  # gone: confirm on the next look before acting
            gone = missing_since is not None and now - missing_since >= 2 * poll_s
            if gone or (executor is None and now - started > start_timeout_s):
                why = f"(pid {executor}) exited" if gone else f"did not start within {start_timeout_s:.0f} s"
                log(
                    f"the SuperNode's executor flower-superexec {why}: no ClientApp can run; "
                    "stopping the SuperNode so that the service manager restarts it"
                )
                _stop(process)
                return EXECUTOR_DIED
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:
            _stop(process)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the supervisor dies, even by SIGKILL
    (the SuperNode then stops cleanly and its executor follows it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the SuperNode and everything it started (:func:`stop_process_tree`)."""
    stop_process_tree(process)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/PID/stat`` field 22): with the pid it names one
    process, not a later one that reuses the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, their children, ...), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = process_state(int(entry.name))
            if state is not None:
                children.setdefault(state[0], []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found:
            found.append(child)
            todo.extend(children.get(child, []))
    return found


def _descendants(pid: int) -> list[tuple[int, str]]:
    """:func:`descendants` with each one's start time (a pid and its start time name one process)."""
    return [(child, started) for child in descendants(pid) if (started := _start_time(child)) is not None]


def stop_process_tree(
    process: subprocess.Popen[bytes], grace_s: float = 10.0, known: Iterable[int] = ()
) -> None:
    """Stop ``process``, its process group and every process it started, also ones that left the
    group (a new session) or outlive it (re-parented when it exits).

    SIGTERM to the group, to each descendant found in /proc and to the ``known`` pids (processes
    seen under it earlier, which may have been re-parented since); the tree is looked up again
    while waiting (children started while stopping). After ``grace_s``, or once none of them is
    alive, SIGKILL to whatever is left - the group too, even when the leader exited cleanly (a
    child that ignores SIGTERM would otherwise stay behind). Linux (/proc).
    """
    tree = {pid: started for pid in known if (started := _start_time(pid)) is not None}

    def refresh() -> None:
        tree.update(_descendants(process.pid))

    def living() -> list[int]:
        return [pid for pid, started in tree.items() if _start_time(pid) == started and _alive(pid)]

    def signal_all(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        for pid in living():  # still the same processes (pid and start time)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    refresh()
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        refresh()
        if process.poll() is not None and not living():
            break
        time.sleep(0.1)
    refresh()
    signal_all(signal.SIGKILL)
    process.wait(timeout=10)
