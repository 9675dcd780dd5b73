"""The two ways to install (pip with pyproject.toml, conda with environment.yml) agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _split(requirement: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    name = m.group(1).lower().replace("_", "-")
    return name, m.group(2).replace(" ", "")


def _pyproject() -> dict:
    """pyproject.toml's [project] table; the tests that read it skip on Python 3.10, which
    has no tomllib (the package itself, and the README's test below, run there)."""
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pyproject_requirements() -> dict[str, str]:
    project = _pyproject()
    reqs = list(project["dependencies"])
    for extra in ("dev", "mpi"):
        reqs += project["optional-dependencies"][extra]
    return dict(_split(r) for r in reqs)


def _environment_requirements() -> dict[str, str]:
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            out.update(_split(d) for d in dep["pip"] if not d.startswith("-e"))
        elif not dep.startswith(("python", "pip")):
            out.update([_split(dep)])
    return out


def test_environment_yml_matches_pyproject():
    py = _pyproject_requirements()
    env = _environment_requirements()
    assert set(py) == set(env), f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"
    for name in py:
        assert py[name] == env[name], f"{name}: pyproject says {py[name]!r}, environment.yml says {env[name]!r}"


def test_console_script_and_module_entry():
    project = _pyproject()
    assert project["scripts"]["swav-ref"] == "swav_ref.cli:main"
    assert (ROOT / "swav_ref" / "__main__.py").exists()


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, f"the quick start must be exactly two commands, found {commands}"
    assert commands[1] in ci, f"the README's test command {commands[1]!r} is not called by .ci/run"
