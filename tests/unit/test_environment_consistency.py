"""environment.yml (conda) and pyproject.toml name the same packages, so both ways of installing agree."""

import re
import tomllib

import pytest
import yaml

from pulse.config import PROJECT_ROOT

NOT_PACKAGES = {"python", "pip"}  # conda needs them to build the environment; pyproject does not list them


def normalized(requirement: str) -> tuple[str, str | None]:
    """(PEP 503 name, lower bound or None) of a pip or conda requirement such as ``psycopg[binary]>=3.1``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)", requirement)
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    bound = re.search(r">=\s*([0-9][^,;\s]*)", match.group(3))
    return name, bound.group(1) if bound else None


def pyproject_requirements(text: str) -> list[str]:
    project = tomllib.loads(text)["project"]
    extras = project.get("optional-dependencies", {})
    return [*project.get("dependencies", []), *(r for group in extras.values() for r in group)]


def environment_requirements(text: str) -> list[str]:
    found = []
    for entry in yaml.safe_load(text)["dependencies"]:
        if isinstance(entry, dict):
            found += [r for r in entry.get("pip", []) if not r.startswith("-")]  # -e . installs the project itself
        else:
            found.append(entry)
    return found


def differences(pyproject: list[str], environment: list[str]) -> list[str]:
    """Every disagreement between the two lists, as sentences; empty when they agree."""
    wanted = dict(map(normalized, pyproject))
    present = {name: bound for name, bound in map(normalized, environment) if name not in NOT_PACKAGES}
    problems = [f"{n} is in pyproject.toml but not in environment.yml" for n in sorted(wanted.keys() - present.keys())]
    problems += [f"{n} is in environment.yml but not in pyproject.toml" for n in sorted(present.keys() - wanted.keys())]
    problems += [
        f"{n}: pyproject.toml wants >={wanted[n]}, environment.yml >={present[n]}"
        for n in sorted(wanted.keys() & present.keys())
        if present[n] and present[n] != wanted[n]
    ]
    return problems


def test_environment_yml_and_pyproject_agree():
    pyproject = pyproject_requirements((PROJECT_ROOT / "pyproject.toml").read_text())
    environment = environment_requirements((PROJECT_ROOT / "environment.yml").read_text())
    assert len(pyproject) >= 10 and len(environment) >= 10
    assert differences(pyproject, environment) == []


def test_environment_yml_is_a_conda_environment_with_python_311_that_installs_the_project():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"] and "pip" in env["dependencies"]
    pip_section = next(e["pip"] for e in env["dependencies"] if isinstance(e, dict))
    assert "-e ." in pip_section


def test_design_card_packages_are_all_there():
    names = {normalized(r)[0] for r in environment_requirements((PROJECT_ROOT / "environment.yml").read_text())}
    assert {
        "jupyterlab",
        "ipywidgets",
        "sqlalchemy",
        "psycopg",
        "pika",
        "redis",
        "pandas",
        "matplotlib",
        "papermill",
        "pytest",
    } <= names


@pytest.mark.parametrize(
    "requirement, expected",
    [
        ("psycopg[binary]>=3.1", ("psycopg", "3.1")),
        ("psycopg_pool >= 3.2", ("psycopg-pool", "3.2")),
        ("PyYAML", ("pyyaml", None)),
        ("ruamel.yaml>=0.18,<1", ("ruamel-yaml", "0.18")),
    ],
)
def test_names_are_normalized(requirement, expected):
    assert normalized(requirement) == expected


def test_a_mismatch_is_reported_both_ways_and_by_version():
    problems = differences(
        ["fastapi>=0.110", "pika>=1.3", "redis>=5.0"], ["python=3.11", "pip", "fastapi>=0.100", "redis>=5.0", "numpy"]
    )
    assert problems == [
        "pika is in pyproject.toml but not in environment.yml",
        "numpy is in environment.yml but not in pyproject.toml",
        "fastapi: pyproject.toml wants >=0.110, environment.yml >=0.100",
    ]
