"""docker/compose.yaml: the services scripts/services.sh starts where a Docker engine runs.

No engine runs on the CI machines, so the file is checked as data; `docker compose config` validates it
too wherever the compose CLI is installed (it needs no engine).
"""

import json
import shutil
import subprocess

import pytest
import yaml

from pulse.config import PROJECT_ROOT

COMPOSE = PROJECT_ROOT / "docker" / "compose.yaml"


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _published(service: dict) -> set[str]:
    return {str(p) for p in service.get("ports", [])}


def test_the_three_services_of_the_system(services):
    assert set(services) == {"postgres", "redis", "rabbitmq"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"].split(":")[1].startswith("7")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3") and "management" in services["rabbitmq"]["image"]


def test_standard_ports_as_the_default_urls_expect(services):
    assert "5432:5432" in _published(services["postgres"])
    assert "6379:6379" in _published(services["redis"])
    assert {"5672:5672", "15672:15672"} <= _published(services["rabbitmq"])


def test_postgres_runs_with_logical_wal_and_the_default_password(services):
    pg = services["postgres"]
    assert "-c wal_level=logical" in pg["command"]
    assert "max_replication_slots=10" in pg["command"] and "max_wal_senders=10" in pg["command"]
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
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)["services"]
    assert set(rendered) == {"postgres", "redis", "rabbitmq"}
    assert "wal_level=logical" in " ".join(rendered["postgres"]["command"])
