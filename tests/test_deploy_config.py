"""The deployment kit's files: compose files (pyyaml), systemd units (configparser), spec template.

Checks the flags the runbook relies on (TLS files, node authentication, ``--database`` on a
volume, ``--isolation process`` with a separate SuperExec, runtime dependency installation off)
and that every file the kit references in the repository exists. No Docker engine is needed.
"""

from __future__ import annotations

import configparser
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pft.client.flower_app import NodeSpec
from pft.server.app import ServerSpec
from pft.server.supervise import HELPERS

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent
BIN = Path(sys.executable).parent


def _compose(name: str) -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / name / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def _flags(arguments: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` / ``--switch`` as a dict ('' for switches)."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(arguments):
        arg = arguments[i]
        assert arg.startswith("--"), arguments
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(arguments) and not arguments[i + 1].startswith("--"):
            key, value = arg, arguments[i + 1]
            i += 1
        else:
            key, value = arg, ""
        flags[key] = value
        i += 1
    return flags


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (host path or named volume)."""
    out = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _check_build(compose_dir: Path, service: dict[str, Any]) -> None:
    context = (compose_dir / service["build"]["context"]).resolve()
    assert context == REPO
    dockerfile = context / service["build"]["dockerfile"]
    assert dockerfile.is_file()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (context / source).exists(), f"{dockerfile.name}: {source} is not in the repo"
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile.read_text()
    assert "torch==2.13.0" in dockerfile.read_text()  # a CPU torch, not the open-ended CUDA one


def test_server_compose() -> None:
    document = _compose("server")
    services = document["services"]
    assert set(services) == {"superlink", "superexec"}
    link, execu = services["superlink"], services["superexec"]
    flags = _flags(link["command"])
    # TLS, node authentication, persistent state on a named volume, ServerApp outside the SuperLink
    assert flags["--ssl-ca-certfile"] == "/certs/ca.crt"
    assert flags["--ssl-certfile"] == "/certs/server.pem"
    assert flags["--ssl-keyfile"] == "/certs/server.key"
    assert "--enable-supernode-auth" in flags and "--insecure" not in flags
    assert "--disable-runtime-dependency-installation" in flags
    assert flags["--isolation"] == "process"
    database = Path(flags["--database"])
    mounts = _mounts(link)
    assert mounts[str(database.parent)] in document["volumes"]  # a named volume, survives restarts
    assert mounts["/certs"] == "./certs"
    assert link["image"] == "flwr/superlink:1.42.0"
    assert link["ports"] == [f"{flags['--port']}:{flags['--port']}"]
    assert link["restart"] == "unless-stopped"
    # the SuperExec reaches the SuperLink by its service name over TLS with the same CA
    exec_flags = _flags(execu["command"])
    assert exec_flags["--runtime-api-address"] == f"superlink:{flags['--port']}"
    assert exec_flags["--root-certificates"] == "/certs/ca.crt"
    assert "--insecure" not in exec_flags and "--allow-runtime-dependency-installation" not in exec_flags
    assert _mounts(execu)["/srv/pft"] == "./srv"
    for service in services.values():
        assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        assert (DEPLOY / "server" / f"{service['env_file']}.example").is_file()
    _check_build(DEPLOY / "server", execu)


def test_site_compose() -> None:
    document = _compose("site")
    node = document["services"]["supernode"]
    flags = _flags(node["command"])
    assert flags["--root-certificates"] == "/etc/pft/ca.crt"
    assert flags["--auth-supernode-private-key"] == "/etc/pft/node.key"
    assert "--insecure" not in flags
    config = dict(item.split("=", 1) for item in shlex.split(flags["--node-config"]))
    assert config["pft-spec"] == "/etc/pft/spec.json" and config["state-dir"].startswith("/var/lib/pft/")
    mounts = _mounts(node)
    assert mounts["/var/lib/pft"] in document["volumes"]  # personal state on a named volume
    assert mounts["/etc/pft"] == "./etc"
    assert node["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    env_example = DEPLOY / "site" / f"{node['env_file']}.example"
    variables = dict(
        line.split("=", 1)
        for line in env_example.read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("PFT_SUPERLINK", "PFT_PARTITION_ID", "PFT_VIDEOS_DIR"):
        assert name in variables
    _check_build(DEPLOY / "site", node)


def _unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    return parser["Service"]


@pytest.mark.parametrize("name", ["pft-superlink.service", "pft-superexec.service", "pft-supernode.service"])
def test_systemd_hardening(name: str) -> None:
    service = _unit(name)
    assert service["User"] == "pft" and service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "true"
    assert service["ReadWritePaths"].split()
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in service["Environment"]
    command = shlex.split(service["ExecStart"])
    assert command[0].startswith("/opt/pft/venv/bin/")
    assert "--insecure" not in command and "--allow-runtime-dependency-installation" not in command


ROLES = {
    "pft-superlink.service": "superlink",
    "pft-superexec.service": "superexec",
    "pft-supernode.service": "supernode",
}


@pytest.mark.parametrize("name", list(ROLES))
def test_systemd_units_put_flowers_helpers_on_path(name: str) -> None:
    """Issue 19: Flower starts flower-superexec / flwr-serverapp / flwr-clientapp BY NAME; a unit
    without the venv on PATH crashed on the first run. Every helper the role starts must be in the
    folder PATH names first, which is the folder the unit's own commands come from."""
    service = _unit(name)
    settings = dict(item.split("=", 1) for item in shlex.split(service["Environment"]))
    first = settings["PATH"].split(":")[0]
    commands = [shlex.split(service[key])[0] for key in ("ExecStartPre", "ExecStart") if key in service]
    assert all(Path(c).parent == Path(first) for c in commands), commands
    for helper in HELPERS[ROLES[name]]:
        assert (BIN / helper).exists(), f"{helper} is not a command this environment installs"
    if ROLES[name] == "supernode":  # supervised: a SuperNode whose executor dies exits non-zero
        assert shlex.split(service["ExecStart"])[1:4] == ["deploy", "supernode", "--"]
    else:  # refused before starting when a helper is missing
        assert shlex.split(service["ExecStartPre"])[1:] == ["deploy", "check", ROLES[name]]


def test_site_image_runs_the_supervised_supernode() -> None:
    dockerfile = (DEPLOY / "site" / "supernode.Dockerfile").read_text()
    assert 'ENTRYPOINT ["pft", "deploy", "supernode", "--"]' in dockerfile


def test_systemd_superlink_and_superexec() -> None:
    link = _flags(shlex.split(_unit("pft-superlink.service")["ExecStart"])[1:])
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(link)
    assert "--enable-supernode-auth" in link and "--disable-runtime-dependency-installation" in link
    assert link["--isolation"] == "process"
    writable = _unit("pft-superlink.service")["ReadWritePaths"].split()
    assert any(link["--database"].startswith(path + "/") for path in writable)  # the DB is writable
    execu = _flags(shlex.split(_unit("pft-superexec.service")["ExecStart"])[1:])
    assert execu["--runtime-api-address"] == f"127.0.0.1:{link['--port']}"
    assert execu["--root-certificates"] == link["--ssl-ca-certfile"]
    assert "/srv/pft" in _unit("pft-superexec.service")["ReadWritePaths"].split()


def test_systemd_supernode() -> None:
    service = _unit("pft-supernode.service")
    command = shlex.split(service["ExecStart"])
    node = _flags(command[command.index("--") + 1 :])
    assert node["--auth-supernode-private-key"].startswith("/etc/pft/")
    assert node["--root-certificates"].startswith("/etc/pft/")
    config = dict(item.split("=", 1) for item in shlex.split(node["--node-config"]))
    assert any(config["state-dir"].startswith(p) for p in service["ReadWritePaths"].split())
    assert (DEPLOY / "systemd" / (Path(service["EnvironmentFile"]).name + ".example")).is_file()


def test_spec_template_validates() -> None:
    document = json.loads((DEPLOY / "server" / "spec.example.json").read_text())
    server = ServerSpec.model_validate(document["server"])
    node = NodeSpec.model_validate(document["node"])
    assert server.audit_log is not None and server.min_nodes <= (server.expected_nodes or 0)
    assert node.layout == "generic"
