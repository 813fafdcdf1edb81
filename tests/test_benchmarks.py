"""Smoke test of the benchmark harness (python -m benchmarks): every server, short cells, no timing checked."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# The harness compiles its load generator and C echo server with $CC or cc.
COMPILER = os.environ.get("CC", "cc")
# A hard limit for the harness process; the run normally takes 10 to 20 s.
HARNESS_TIMEOUT_SECONDS = 50

LOAD_CELLS = {
    "echo-16B-32": {"gaspar", "gaspar-prefetch4", "asyncio-pool", "python-inline", "c-echo"},
    "cpu-2ms-1": {"gaspar", "gaspar-prefetch4", "asyncio-pool", "python-inline"},
}
LONG_RUN_REQUESTS = 2000


def compiler_available() -> bool:
    words = shlex.split(COMPILER)
    return bool(words) and shutil.which(words[0]) is not None


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    """Run a tiny harness into a temporary directory; return (exit status, output, output directory)."""
    if not compiler_available():
        pytest.skip(f"no C compiler ({COMPILER!r} not on PATH): the harness compiles its load generator")
    output_dir = tmp_path_factory.mktemp("benchmarks")
    command = [
        sys.executable, "-m", "benchmarks", "--quick",
        "--duration", "1",
        "--cells", ",".join([*LOAD_CELLS, "long-run", "framing"]),
        "--long-run-requests", str(LONG_RUN_REQUESTS),
        "--output-dir", str(output_dir),
    ]  # fmt: skip
    # subprocess_env() puts the gaspar under test first on PYTHONPATH. The benchmarks
    # package is not installed, so the repository root follows it. The working
    # directory is not the root, where `python -m` would import gaspar/ from the
    # working tree instead.
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(REPOSITORY_ROOT)])

    # A session of its own, so a hung harness and every server it started go with one killpg().
    process = subprocess.Popen(
        command,
        cwd=output_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=HARNESS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the harness ran past {HARNESS_TIMEOUT_SECONDS} s; output:\n{output.decode(errors='replace')}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output.decode(errors="replace"), output_dir


@pytest.fixture(scope="module")
def results(harness_run):
    status, output, output_dir = harness_run
    assert status == 0, f"the harness exited with status {status}; output:\n{output}"
    return json.loads((output_dir / "results.json").read_text())


def test_harness_exits_cleanly(harness_run):
    status, output, _ = harness_run
    assert status == 0, f"the harness exited with status {status}; output:\n{output}"


def test_harness_runs_every_server(results):
    ran = {}
    for run in results["runs"]:
        ran.setdefault(run["cell"], set()).add(run["server"])
    assert ran == LOAD_CELLS


def test_harness_runs_have_no_errors(results):
    for run in results["runs"]:
        label = f"{run['cell']} {run['server']}"
        assert run["failure"] is None, label
        assert run["completed"] > 0, label
        assert run["error_total"] == 0, f"{label}: {run['errors']}"
        assert run["warmup_errors"] == 0, label


def test_harness_long_run_completes(results):
    long_run = results["long_run"]
    assert long_run["failure"] is None
    assert long_run["completed"] == LONG_RUN_REQUESTS
    assert long_run["error_total"] == 0
    assert long_run["first_window"]["end"] == LONG_RUN_REQUESTS // 2
    assert long_run["last_window"]["end"] == LONG_RUN_REQUESTS


def test_harness_framing_case_runs(results):
    framing = results["framing"]
    assert framing["failure"] is None
    assert framing["python_seconds"] > 0


def test_harness_writes_report(harness_run, results):
    _, _, output_dir = harness_run
    report = (output_dir / "RESULTS.md").read_text()
    for cell in LOAD_CELLS:
        assert f"## {cell}:" in report
    assert "## Targets" in report
    assert "## long-run" in report
    assert "## framing" in report
    assert len(results["targets"]) > 0
