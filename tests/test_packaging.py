"""The two ways to install (pip with pyproject.toml, conda with environment.yml) agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


#: pyproject.toml names whose conda-forge package is called otherwise.
CONDA_NAMES = {"cupy-cuda12x": "cupy"}  # conda-forge's cupy is the CUDA build


def _split(requirement: str) -> tuple[str, str, str]:
    """(name, version specifier, environment marker or ""), spaces removed."""
    spec, _, marker = requirement.partition(";")
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec)
    name = m.group(1).lower().replace("_", "-")
    return CONDA_NAMES.get(name, name), m.group(2).replace(" ", ""), marker.replace(" ", "")


def _pyproject() -> dict:
    """pyproject.toml's [project] table; the tests that read it skip on Python 3.10, which
    has no tomllib (the package itself, and the README's test below, run there)."""
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _pyproject_requirements() -> dict[str, tuple[str, str]]:
    """name -> (specifier, marker) of the dependencies and the dev, mpi and gpu extras."""
    project = _pyproject()
    reqs = list(project["dependencies"])
    for extra in ("dev", "mpi", "gpu"):
        reqs += project["optional-dependencies"][extra]
    return {name: (spec, marker) for name, spec, marker in map(_split, reqs)}


#: A requirement commented out in environment.yml: "  # - name>=1.0" (an optional block, such
#: as the mpi and gpu extras, that does not install on every platform).
_COMMENTED = re.compile(r"^\s*#\s*-\s+([A-Za-z0-9_.\-]+.*?)\s*$", re.M)


def _environment_requirements() -> dict[str, tuple[str, str, str]]:
    """name -> (specifier, marker, where) of environment.yml's packages; ``where`` is "conda"
    (a conda package: conda applies no markers), "pip" (its pip: section) or "commented"
    (an optional block, to uncomment where it installs)."""
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    out = {}
    for dep in yaml.safe_load(text)["dependencies"]:
        if isinstance(dep, dict):
            out.update((name, (spec, marker, "pip")) for name, spec, marker in
                       map(_split, (d for d in dep["pip"] if not d.startswith("-e"))))
        elif not dep.startswith(("python", "pip")):
            name, spec, marker = _split(dep)
            out[name] = (spec, marker, "conda")
    for line in _COMMENTED.findall(text):
        name, spec, marker = _split(line)
        out[name] = (spec, marker, "commented")
    return out


def test_environment_yml_matches_pyproject():
    py = _pyproject_requirements()
    env = _environment_requirements()
    assert set(py) == set(env), f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"
    for name, (spec, marker) in py.items():
        env_spec, env_marker, where = env[name]
        assert spec == env_spec, f"{name}: pyproject says {spec!r}, environment.yml says {env_spec!r}"
        if where == "pip":
            assert marker == env_marker, f"{name}: pyproject's marker is {marker!r}, environment.yml's {env_marker!r}"
        elif where == "conda":  # conda ignores pip's markers: a platform-limited package would break the others
            assert not marker, (f"{name}: pyproject installs it only where {marker}, but environment.yml lists it "
                                "for every platform; comment it out as an optional block, or move it to pip:")


def test_mpi_extra_installs_on_windows_without_mpich():
    # PyPI's mpich has no Windows build (only an empty 0.0.0 placeholder), so "pip install
    # swav_ref[mpi]" failed there; Windows's MPI is MS-MPI, which mpi4py's wheel uses.
    requirements = pytest.importorskip("packaging.requirements")
    mpi = [requirements.Requirement(r) for r in _pyproject()["optional-dependencies"]["mpi"]]

    def installed_on(platform: str) -> list[str]:
        env = {"sys_platform": platform, "extra": "mpi"}
        return sorted(r.name for r in mpi if r.marker is None or r.marker.evaluate(env))

    assert installed_on("win32") == ["mpi4py"]
    assert installed_on("linux") == installed_on("darwin") == ["mpi4py", "mpich"]
    install = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    assert "MS-MPI" in install and "Windows" in install


def test_environment_yml_installs_mpi_where_it_can():
    # conda-forge has no MPICH for Windows: environment.yml takes MPI from PyPI, in its
    # pip: section, whose markers leave MPICH out on Windows (as the mpi extra does) and
    # keep it on Linux and macOS.
    env = _environment_requirements()
    assert env["mpi4py"][2] == "pip" and not env["mpi4py"][1]
    assert env["mpich"][2] == "pip" and env["mpich"][1] == "sys_platform!='win32'"  # spaces removed


def test_console_script_and_module_entry():
    project = _pyproject()
    assert project["scripts"]["swav-ref"] == "swav_ref.cli:main"
    assert (ROOT / "swav_ref" / "__main__.py").exists()


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, f"the quick start must be exactly two commands, found {commands}"
    assert commands[1] in ci, f"the README's test command {commands[1]!r} is not called by .ci/run"


def test_the_version_is_the_same_in_the_package_and_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import swav_ref

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert swav_ref.__version__ == project["version"]
