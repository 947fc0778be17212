"""The import direction of the package layout: the core (every module of ``pulse`` outside ``pulse.lab``,
``pulse.tools`` and ``pulse.cli``) imports none of those three; the tools import neither the lab nor the CLI;
the lab may use the tools but not the CLI.

Read from each module's syntax tree, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PULSE = Path(__file__).resolve().parents[2] / "pulse"
FORBIDDEN = {
    "core": ("pulse.lab", "pulse.tools", "pulse.cli"),
    "tools": ("pulse.lab", "pulse.cli"),
    "lab": ("pulse.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PULSE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "pulse.__main__":  # ``python -m pulse``: the command line's entry point
        return "cli"
    for prefix in ("pulse.lab", "pulse.tools", "pulse.cli"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix.split(".")[1]
    return "core"


def imported(source: str, package: str) -> set[str]:
    """Every module ``source`` imports: ``import a.b``, ``from a.b import c`` (a.b and a.b.c, since c may be a
    module); relative imports resolved against ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_of(path: Path) -> set[str]:
    module = module_name(path)
    return imported(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = sorted(PULSE.rglob("*.py"))


def test_every_layer_is_present():
    assert {layer(module_name(p)) for p in MODULES} == {"core", "lab", "tools", "cli"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_inwards(path):
    forbidden = FORBIDDEN.get(layer(module_name(path)), ())
    wrong = sorted(n for n in imports_of(path) if any(within(n, f) for f in forbidden))
    assert not wrong, f"{module_name(path)} ({layer(module_name(path))}) imports {wrong}"


def test_the_check_sees_lazy_and_relative_imports():
    # Most of the package's imports sit inside functions; a relative one must resolve to its absolute name.
    source = "def f():\n    from pulse.tools.chaos import Campaign\n    from .. import lab\n    import pulse.cli\n"
    names = imported(source, "pulse.orders")
    assert {"pulse.tools.chaos", "pulse.lab", "pulse.cli"} <= names
    assert [f for f in FORBIDDEN["core"] if any(within(n, f) for n in names)] == list(FORBIDDEN["core"])
