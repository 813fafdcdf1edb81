"""Static checks: mypy --strict on the package, and stubtest on the compiled module's stub."""

import importlib.util
import os
import subprocess
import sys

import pytest

import gaspar

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed; pip install '.[test]' installs it"
)

PACKAGE_DIR = os.path.dirname(gaspar.__file__)


def run_python_module(tmp_path, *arguments, **environment):
    """Run ``python -m ARGUMENTS`` in tmp_path with extra environment variables; return the result."""
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, **environment},
    )


def search_path_environment(variable: str) -> dict:
    """Return ``{variable: the folder holding gaspar}`` for an in-place build, or {} for an installed one.

    Adding site-packages itself to mypy's path would make mypy check every
    installed module as project code.
    """
    parent = os.path.dirname(PACKAGE_DIR)
    return {} if os.path.basename(parent) == "site-packages" else {variable: parent}


@pytest.mark.timeout(300)
def test_package_mypy_strict(tmp_path):
    result = run_python_module(
        tmp_path,
        "mypy",
        "--strict",
        "--cache-dir",
        str(tmp_path / "cache"),
        "-p",
        "gaspar",
        **search_path_environment("MYPYPATH"),
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_framing_stub_matches_module(tmp_path):
    if importlib.util.find_spec("gaspar._framing") is None:
        pytest.skip("the C extension gaspar._framing is not built")

    result = run_python_module(
        tmp_path,
        "mypy.stubtest",
        "gaspar._framing",
        "--mypy-config-file",
        os.devnull,
        **search_path_environment("PYTHONPATH"),
    )

    assert result.returncode == 0, result.stdout + result.stderr
