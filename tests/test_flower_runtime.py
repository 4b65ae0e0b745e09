"""The SuperLink the Flower engine starts for each run is its own (own FLWR_HOME, own port) and is
stopped with every process under it, also when the block fails; a run that fails says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pft.core.errors import FlowerRuntimeError
from pft.server.supervise import descendants
from pft.simulations.flower_runtime import (
    CONNECTION,
    FlowerRunSettings,
    LocalSuperLink,
    _federation_config,
    run_flower_app,
    write_app,
)

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _stale_superlinks() -> list[int]:
    """Live processes naming a pft FLWR_HOME that no longer exists (a SuperLink left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for word in words:
            if "pft-flwr-home-" in word and not Path(word).parent.exists():
                found.append(int(entry.name))
    return found


def test_two_superlinks_are_private_and_each_stops_with_its_tree_on_failure() -> None:
    pids: list[int] = []
    homes: list[Path] = []
    with pytest.raises(KeyboardInterrupt), LocalSuperLink() as first, LocalSuperLink() as second:
        for link in (first, second):
            assert link.process is not None
            assert link.home.stat().st_mode & 0o777 == 0o700
            assert f"127.0.0.1:{link.port}" in (link.home / "config.toml").read_text()
            listed = link.flwr("ls", CONNECTION, "--format", "json")
            assert listed.returncode == 0, listed.stdout + listed.stderr
            pids += [link.process.pid, *descendants(link.process.pid)]
            homes.append(link.home)
        assert first.port != second.port and first.home != second.home
        assert len(pids) >= 4  # each SuperLink started its SuperExec
        raise KeyboardInterrupt  # Ctrl-C in the middle of a run
    assert [p for p in pids if _alive(p)] == []
    assert not any(h.exists() for h in homes)


def test_a_run_that_fails_raises_with_its_status_and_leaves_nothing_running(tmp_path: Path) -> None:
    settings = FlowerRunSettings(num_supernodes=1, run_timeout_s=300)
    with pytest.raises(FlowerRuntimeError, match="finished:failed"):
        # the ServerApp finds no spec file at this path: the run fails inside Flower
        run_flower_app(
            "pft.server.app:app",
            "pft.client.flower_app:app",
            {"pft-spec": str(tmp_path / "missing.json")},
            settings,
            log_file=tmp_path / "flower.log",
        )
    assert (tmp_path / "flower.log").is_file()
    assert _stale_superlinks() == []


def test_the_app_folder_names_importable_components_and_the_run_config(tmp_path: Path) -> None:
    values = write_app(tmp_path / "app", "pft.server.app:app", "mod:attr", {"pft-spec": 'a "b"\\c'})
    import tomllib

    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "pft.server.app:app",
        "clientapp": "mod:attr",
    }
    assert project["tool"]["flwr"]["app"]["config"] == {"pft-spec": ""}
    assert tomllib.loads(values.read_text()) == {"pft-spec": 'a "b"\\c'}
    with pytest.raises(ValueError, match="module:attribute"):
        write_app(tmp_path / "bad", "pft.server.app", "mod:attr", {})
    assert os.access(values, os.R_OK)


def test_the_federation_config_sizes_the_runs_own_ray_only_when_asked() -> None:
    plain = FlowerRunSettings(num_supernodes=3)
    assert _federation_config(plain) == (
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0 verbose=false"
    )
    sized = FlowerRunSettings(num_supernodes=3, ray_num_cpus=2)
    assert _federation_config(sized).endswith(" init-args-num-cpus=2")
    with pytest.raises(ValueError, match="ray_address"):
        FlowerRunSettings(num_supernodes=3, ray_num_cpus=2, ray_address="auto")
