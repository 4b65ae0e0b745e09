"""What the SDK leaves on the device (docs/reliability.md case 14, device side): a whole session - install
a bundle, enroll from videos (isolated decoder process), predict, save, load, predict - writes
nothing outside ``state_dir`` and opens no network socket.

Checked two ways in a fresh interpreter: a Python audit hook records every file write, rename,
delete, mkdir and socket call of the SDK's process, and a snapshot of every folder the session
could touch (inputs, HOME, TMPDIR, the working directory) must be unchanged afterwards (this also
covers the decoder's worker process, which the hook does not see).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sdk_support import SdkWorld, shared_world

_SESSION = textwrap.dedent(
    """
    import json, os, sys
    from pft.client.sdk import Personalizer
    from pft.client.store import StoreKey

    bundle, pem, state, videos, probe = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:-1], sys.argv[-1]
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = []

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writes = (flags or 0) & WRITE or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes:
                events.append(["open", os.fsdecode(path)])
        elif event in ("os.rename", "os.replace", "os.link", "os.symlink", "shutil.copyfile"):
            events.append([event, os.fsdecode(args[0]), os.fsdecode(args[1])])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.chmod"):
            if not isinstance(args[0], int):
                events.append([event, os.fsdecode(args[0])])
        elif event.startswith("socket.") and event not in ("socket.gethostname",):
            events.append([event, repr(args)[:80]])

    if __name__ == "__main__":  # the decoder worker is a spawned process that re-imports this file
        sys.addaudithook(hook)
        key = StoreKey.from_passphrase("a passphrase")
        with Personalizer.from_bundle(bundle, pem, state_dir=state, key=key, owner="alice") as p:
            p.predict(probe)
            report = p.enroll(videos)
            p.predict(probe)
            p.save()
        with Personalizer.load(state, pem, StoreKey.from_passphrase("a passphrase"), owner="alice") as q:
            q.predict(probe)
            q.save()
        print(json.dumps({"events": events, "frames": report.frames_used}))
    """
)


def _snapshot(roots: list[Path], skip: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here == skip or skip in here.parents:
                dirnames[:] = []
                continue
            out[str(here)] = (-1, 0)
            for name in filenames:
                st = (here / name).lstat()
                out[str(here / name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_a_whole_session_writes_only_inside_state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    world: SdkWorld = shared_world(tmp_path_factory)
    base = tmp_path_factory.mktemp("privacy")
    home, tmp, cwd, state = base / "home", base / "tmp", base / "cwd", base / "state"
    for d in (home, tmp, cwd):
        d.mkdir()
    script = base / "session.py"
    script.write_text(_SESSION)
    roots = [world.root, base]
    before = _snapshot(roots, state)
    # A fresh app process: torch in this pytest process may already have exported its own cache
    # folder (TORCHINDUCTOR_CACHE_DIR) into os.environ, which the child must not inherit.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    env = {
        **inherited,
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "PYTHONDONTWRITEBYTECODE": "1",  # the interpreter's .pyc cache is not the SDK's doing
    }
    videos = [str(v) for v in world.target_videos("adapt")]
    probe = str(world.target_videos("eval")[0])
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(world.bundle_v1),
            str(world.public_pem),
            str(state),
            *videos,
            probe,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["frames"] == 16
    assert _snapshot(roots, state) == before  # nothing created, changed or removed outside state_dir

    inside = state.resolve()
    outside = []
    for event in result["events"]:
        kind, paths = event[0], event[1:]
        if kind.startswith("socket."):
            outside.append(event)
            continue
        for p in paths:
            resolved = Path(p if os.path.isabs(p) else cwd / p).resolve()
            if (
                resolved != inside
                and inside not in resolved.parents
                and not str(resolved).startswith("/dev/")
            ):
                outside.append(event)
    assert outside == []
    assert any(e[0] == "open" and e[1].endswith("personal.store.lock") for e in result["events"])  # hook live
    assert sorted(p.name for p in state.iterdir()) == [
        ".torch-cache",  # torch's import-time cache folder, kept in here (see pft.client.sdk)
        "bundles",
        "personal.store",
        "personal.store.counter",  # the generation high-water mark (an older copy is refused)
        "personal.store.lock",
        "personal.store.prev",
        "privacy_ledger.store",  # the encrypted ledger, created before the first personal state
        "privacy_ledger.store.copy",  # its mirror (a torn copy loses no release)
        "privacy_ledger.store.counter",
        "privacy_ledger.store.lock",
    ]
