"""docker-compose.yml, deploy/ and the Dockerfile, checked without a Docker engine: the
topology, the commands, the drain timing arithmetic, Envoy's sizing, retries and address
forwarding, and that the stack can be called (the JWKS it mounts is what `entrepot keys
create` writes)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml
from compose_spec import PyCompose

from server.cli import parser
from server.client_address import parse_networks
from server.services import SERVICES

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = ("server-1", "server-2")


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
    ours = {name: s for name, s in services.items() if s.get("image") == "entrepot:local"}
    assert set(ours) == {"migrate", "server-1", "server-2", "worker"}
    for name, s in ours.items():
        assert s["command"][0] in commands, name
        env = s["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and env["TEMPORAL_ADDRESS"] == "temporal:7233"
    # One image, built once: only one service builds it, the others run it and never pull it.
    assert [name for name, s in services.items() if "build" in s] == ["migrate"]
    assert all(s.get("pull_policy") == "never" for name, s in ours.items() if name != "migrate")


def test_compose_mounts_point_at_files_in_the_repo() -> None:
    services = _compose().to_dict()["services"]
    for s in services.values():
        for volume in s.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    envoy = (ROOT / "deploy" / "envoy.yaml").read_text()
    for replica in REPLICAS:
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


def _seconds(value: str | int | float) -> float:
    """'1s', '250ms', '1m30s', 20 -> seconds (compose and Envoy durations)."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def _envoy() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())  # type: ignore[no-any-return]


def _cluster() -> dict[str, Any]:
    (cluster,) = _envoy()["static_resources"]["clusters"]
    return cluster  # type: ignore[no-any-return]


def _routes() -> list[dict[str, Any]]:
    (listener,) = _envoy()["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    (host,) = hcm["typed_config"]["route_config"]["virtual_hosts"]
    return host["routes"]  # type: ignore[no-any-return]


def test_drain_timing_holds() -> None:
    """A SIGTERMed replica reports NOT_SERVING for longer than Envoy needs to take it out of
    rotation, and Docker waits longer than the delay plus the grace before SIGKILL."""
    (check,) = _cluster()["health_checks"]
    assert "grpc_health_check" in check
    detection = check["unhealthy_threshold"] * _seconds(check["interval"]) + _seconds(check["timeout"])
    detection += _seconds(check.get("interval_jitter", "0s"))
    services = _compose().to_dict()["services"]
    for replica in REPLICAS:
        s = services[replica]
        delay = float(s["environment"]["ENTREPOT_SHUTDOWN_DELAY_SECONDS"])
        grace = float(s["environment"]["ENTREPOT_GRACE_SECONDS"])
        assert delay > detection, f"{replica}: shutdown delay {delay}s <= Envoy detection {detection}s"
        stop = _seconds(s["stop_grace_period"])
        assert stop > delay + grace, f"{replica}: stop_grace_period {stop}s <= delay + grace {delay + grace}s"


def test_envoy_is_sized_for_thousands_of_watch_streams() -> None:
    (thresholds,) = _cluster()["circuit_breakers"]["thresholds"]
    # P6 holds 1,010+ long-lived watch streams; unary traffic comes on top.
    assert thresholds["max_requests"] >= 10_000 and thresholds["max_pending_requests"] >= 1_000
    h2 = _cluster()["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    streams = h2["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"]
    from server.settings import Settings

    assert streams <= Settings().max_concurrent_streams  # never more per connection than a replica accepts


def test_envoy_retries_only_unary_calls_and_only_when_they_cannot_have_reached_a_replica() -> None:
    routes = _routes()
    catch_all = routes[-1]
    assert catch_all["match"] == {"prefix": "/"}
    policy = catch_all["route"]["retry_policy"]
    assert set(policy["retry_on"].split(",")) == {"connect-failure", "refused-stream"}
    assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    streaming = {
        f"/{spec.descriptor.full_name}/{m.name}"
        for spec in SERVICES
        for m in spec.descriptor.methods
        if m.client_streaming or m.server_streaming
    }
    own_routes = {r["match"].get("path"): r["route"] for r in routes[:-1]}
    assert set(own_routes) == streaming
    for path, route in own_routes.items():
        assert "retry_policy" not in route and route["timeout"] == "0s", path


def test_client_address_is_forwarded_and_believed_only_from_envoy() -> None:
    (listener,) = _envoy()["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["use_remote_address"] is True and hcm["xff_num_trusted_hops"] == 0
    compose = _compose().to_dict()
    envoy_ip = ipaddress.ip_address(compose["services"]["envoy"]["networks"]["default"]["ipv4_address"])
    (subnet,) = compose["networks"]["default"]["ipam"]["config"]
    assert envoy_ip in ipaddress.ip_network(subnet["subnet"])
    for replica in REPLICAS:
        trusted = parse_networks(compose["services"][replica]["environment"]["ENTREPOT_TRUSTED_PROXIES"])
        assert trusted == (ipaddress.ip_network(f"{envoy_ip}/32"),), replica


def test_restart_policies_and_start_order() -> None:
    services = _compose().to_dict()["services"]
    for name, s in services.items():
        expected = "on-failure" if name == "migrate" else "unless-stopped"
        assert s.get("restart") == expected, name
    assert "healthcheck" in services["temporal"]
    for name in (*REPLICAS, "worker"):
        depends = services[name]["depends_on"]
        assert depends["temporal"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_the_stack_can_be_called_with_keys_from_entrepot_keys_create(tmp_path: Path) -> None:
    """The secret compose mounts is the JWKS `entrepot keys create --dir deploy/keys` writes;
    the servers are RS256-only and read it from the secret's path."""
    compose = _compose().to_dict()
    source = Path(compose["secrets"]["jwks.json"]["file"])
    keys = parser().parse_args(["keys", "create"])
    from server.keys import JWKS_NAME, create

    assert source == Path(".") / keys.dir / JWKS_NAME
    pem, jwks = create(tmp_path / keys.dir, "deploy-test")
    assert jwks.name == source.name and pem.parent == jwks.parent
    for replica in REPLICAS:
        env = compose["services"][replica]["environment"]
        assert env["ENTREPOT_JWT_ALGORITHMS"] == "RS256"
        assert env["ENTREPOT_JWT_JWKS_FILE"] == f"/run/secrets/{source.name}"
    ignored = (ROOT / source.parent / ".gitignore").read_text().splitlines()
    assert "*" in ignored  # private keys never get committed


def test_prometheus_scrapes_the_worker_on_the_image_worker_metrics_port() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    port = re.search(r"ENTREPOT_WORKER_METRICS_PORT=(\d+)", dockerfile)
    assert port and port.group(1) in dockerfile.split("EXPOSE", 1)[1].splitlines()[0]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for cfg in job["static_configs"] for t in cfg["targets"]}
    assert f"worker:{port.group(1)}" in targets
