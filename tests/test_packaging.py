"""What an installation holds: one import namespace, ``venna``, whatever the project around it
is called, and a command that says its version."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import venna

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT)],
        cwd=out,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = out.glob("venna-*.whl")
    return built


@pytest.mark.timeout(150)
def test_the_wheel_holds_only_the_venna_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"venna", f"venna-{venna.__version__}.dist-info"}
    for module in ("server/app.py", "backends/echo.py", "gateway_http/app.py", "cli/commands.py"):
        assert f"venna/{module}" in names
    # The contract ships with its sources and type stubs, for clients that compile or check it.
    for suffix in (".proto", "_pb2.py", "_pb2.pyi"):
        assert f"venna/responses/v1/service{suffix}" in names
    assert "venna/py.typed" in names


@pytest.mark.timeout(150)
def test_an_installed_wheel_runs_beside_a_project_with_its_own_server_package(
    wheel: Path, tmp_path: Path
) -> None:
    """Generic top-level names would collide with a user's own packages; ``venna.*`` does not."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    project = tmp_path / "project"
    for name in ("server", "backends", "gateway_http"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("raise ImportError('a package of the project')\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import venna.cli, venna.server.app; print(venna.cli.__file__)"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target))
    version = subprocess.run(
        [sys.executable, "-m", "venna.cli", "--version"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert version.stdout.strip() == f"venna {venna.__version__}"


def test_the_command_says_its_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "venna.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert run.stdout.strip() == f"venna {venna.__version__}"
    assert venna.__version__ != "0+unknown"
