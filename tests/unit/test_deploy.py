"""docker-compose.yml and the Dockerfile, checked without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

from compose_spec import PyCompose

from server.cli import parser

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> PyCompose:
    return PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_and_has_the_topology() -> None:
    c = _compose()
    c.validate()
    assert set(c.service_names()) == {
        "postgres",
        "temporal",
        "temporal-ui",
        "migrate",
        "server-1",
        "server-2",
        "worker",
        "envoy",
        "prometheus",
    }


def test_compose_commands_are_real_cli_commands() -> None:
    commands = set(parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    services = _compose().to_dict()["services"]
    built = {name: s for name, s in services.items() if "build" in s}
    assert set(built) == {"migrate", "server-1", "server-2", "worker"}
    for name, s in built.items():
        assert s["command"][0] in commands, name
        env = s["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and env["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_compose_mounts_point_at_files_in_the_repo() -> None:
    services = _compose().to_dict()["services"]
    for s in services.values():
        for volume in s.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    envoy = (ROOT / "deploy" / "envoy.yaml").read_text()
    for replica in ("server-1", "server-2"):
        assert replica in prometheus and replica in envoy


def test_dockerfile_runs_the_same_cli_the_readme_documents() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["entrepot"]' in dockerfile
    assert re.search(r"FROM .* AS build", dockerfile) and "COPY --from=build" in dockerfile
    for path in re.findall(r"^COPY (?!--)(\S+)", dockerfile, flags=re.M):
        assert (ROOT / path).exists(), path
    readme = (ROOT / "README.md").read_text()
    for command in ("entrepot migrate", "entrepot serve", "entrepot worker"):
        assert command in readme


def test_replicas_are_reached_only_through_envoy_and_scraped_on_the_image_metrics_port() -> None:
    services = _compose().to_dict()["services"]
    for replica in ("server-1", "server-2"):
        assert "ports" not in services[replica], f"{replica} must be reached through envoy only"
    assert "50051:50051" in services["envoy"]["ports"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    listen_port = re.search(r"ENTREPOT_LISTEN=0\.0\.0\.0:(\d+)", dockerfile)
    metrics_port = re.search(r"ENTREPOT_METRICS_PORT=(\d+)", dockerfile)
    assert listen_port and metrics_port
    envoy = (ROOT / "deploy" / "envoy.yaml").read_text()
    # HTTP/2 upstream (gRPC) with gRPC health checks, so a draining replica leaves rotation.
    assert "http2_protocol_options" in envoy and "grpc_health_check" in envoy
    assert envoy.count(f"port_value: {listen_port.group(1)}") >= 3  # listener + both replicas
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    for replica in ("server-1", "server-2"):
        assert f"{replica}:{metrics_port.group(1)}" in prometheus
