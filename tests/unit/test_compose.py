"""docker/compose.yaml: the services scripts/services.sh starts where a Docker engine runs.

No engine runs on the CI machines, so the file is checked as data; `docker compose config` validates it
too wherever the compose CLI is installed (it needs no engine).
"""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from pulse.config import PROJECT_ROOT

COMPOSE = PROJECT_ROOT / "docker" / "compose.yaml"


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}


def _published(service: dict) -> set[str]:
    """Each port as "host port:container port", whatever the host address it is bound to."""
    return {f"{_port_binding(p)[1]}:{_port_binding(p)[2]}" for p in service.get("ports", [])}


def _port_binding(port) -> tuple[str | None, str, str]:
    """(host address or None for every interface, host port, container port) of one compose ports entry.

    Short syntax: "C", "P:C", "H:P:C" (H may be an IPv6 address in brackets), each with an optional "/proto";
    long syntax: a mapping with target, published and host_ip. A bare "C" publishes C on an ephemeral port
    of every interface."""
    if isinstance(port, dict):
        target = str(port["target"])
        return port.get("host_ip") or None, str(port.get("published", "")), target
    text = str(port).split("/")[0]
    match = re.fullmatch(r"(?:(\[[^\]]+\]|[^:\[\]]+):)??(?:([\d-]*):)?([\d-]+)", text)
    if match is None:
        raise ValueError(f"cannot parse the ports entry {port!r}")
    host, published, target = match.groups()
    return host or None, published or "", target


def _exposed(services: dict) -> list[str]:
    """Every "service: entry" whose published port listens on something other than loopback."""
    return [
        f"{name}: {port}"
        for name, service in services.items()
        for port in service.get("ports", [])
        if _port_binding(port)[0] not in LOOPBACK
    ]


def test_the_three_services_of_the_system(services):
    assert set(services) == {"postgres", "redis", "rabbitmq"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"].split(":")[1].startswith("7")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3") and "management" in services["rabbitmq"]["image"]


def test_standard_ports_as_the_default_urls_expect(services):
    assert "5432:5432" in _published(services["postgres"])
    assert "6379:6379" in _published(services["redis"])
    assert {"5672:5672", "15672:15672"} <= _published(services["rabbitmq"])


def test_every_port_is_published_on_loopback_only(services):
    # Superuser postgres/postgres, Redis without a password and the RabbitMQ UI must not face the café Wi-Fi.
    assert _exposed(services) == []


@pytest.mark.parametrize(
    "entry, binding",
    [
        ("5432", (None, "", "5432")),
        ("5432:5432", (None, "5432", "5432")),
        ("0.0.0.0:5432:5432", ("0.0.0.0", "5432", "5432")),
        ("127.0.0.1:5432:5432", ("127.0.0.1", "5432", "5432")),
        ("127.0.0.1::5432", ("127.0.0.1", "", "5432")),
        ("[::1]:6379:6379/tcp", ("[::1]", "6379", "6379")),
        ("9000-9001:9000-9001", (None, "9000-9001", "9000-9001")),
        ({"target": 5672, "published": "5672"}, (None, "5672", "5672")),
        ({"target": 5672, "published": 5672, "host_ip": "127.0.0.1"}, ("127.0.0.1", "5672", "5672")),
    ],
)
def test_port_entries_are_read_in_both_syntaxes(entry, binding):
    assert _port_binding(entry) == binding


def test_the_loopback_check_catches_every_way_of_opening_a_port():
    opened = {
        "a": {
            "ports": [
                "5432",
                "5432:5432",
                "0.0.0.0:1:1",
                {"target": 2, "published": 2},
                {"target": 3, "host_ip": "0.0.0.0"},
            ]
        },
        "b": {"ports": ["127.0.0.1:4:4", "[::1]:5:5", {"target": 6, "host_ip": "127.0.0.1"}]},
    }
    assert len(_exposed(opened)) == 5 and all(e.startswith("a: ") for e in _exposed(opened))


def test_postgres_runs_with_logical_wal_and_the_default_password(services):
    pg = services["postgres"]
    assert "-c wal_level=logical" in pg["command"]
    assert "max_replication_slots=10" in pg["command"] and "max_wal_senders=10" in pg["command"]
    assert "-c max_slot_wal_keep_size=4GB" in pg["command"]  # an abandoned slot cannot fill the disk
    assert pg["environment"]["POSTGRES_PASSWORD"] == "postgres"  # the password in the default PULSE_DATABASE_URL


def test_redis_keeps_nothing_on_disk(services):
    command = services["redis"]["command"]
    assert '--save ""' in command and "--appendonly no" in command


@pytest.mark.parametrize("name", ["postgres", "redis", "rabbitmq"])
def test_every_service_has_a_healthcheck(services, name):
    check = services[name]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
    assert check["retries"] > 0


def test_docker_compose_accepts_the_file():
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed, so `docker compose config` cannot validate the file")
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin here (`docker compose version` fails)")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)["services"]
    assert set(rendered) == {"postgres", "redis", "rabbitmq"}
    assert "wal_level=logical" in " ".join(rendered["postgres"]["command"])
