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


def run_python_module(tmp_path, *arguments):
    """Run ``python -m ARGUMENTS`` in tmp_path, importing the gaspar under test; return the result."""
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.path.dirname(PACKAGE_DIR)},
    )


@pytest.mark.timeout(300)
def test_package_mypy_strict(tmp_path):
    result = run_python_module(tmp_path, "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), PACKAGE_DIR)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_framing_stub_matches_module(tmp_path):
    if importlib.util.find_spec("gaspar._framing") is None:
        pytest.skip("the C extension gaspar._framing is not built")

    result = run_python_module(tmp_path, "mypy.stubtest", "gaspar._framing", "--mypy-config-file", os.devnull)

    assert result.returncode == 0, result.stdout + result.stderr
