"""Shared pytest fixtures."""

import importlib
import os

import pytest


@pytest.fixture(params=["python", "c"])
def framing(request):
    """Return each framing implementation module: the pure-Python twin, then the C core.

    A missing C core fails the test, so CI cannot pass without building it,
    unless GASPAR_NO_EXTENSIONS=1 marks a pure-Python build as intended.
    """
    if request.param == "python":
        return importlib.import_module("gaspar._framing_py")
    try:
        return importlib.import_module("gaspar._framing")
    except ImportError as error:
        if os.environ.get("GASPAR_NO_EXTENSIONS") == "1":
            pytest.skip(f"GASPAR_NO_EXTENSIONS=1 and the C core gaspar._framing is not built ({error})")
        pytest.fail(
            f"the C extension gaspar._framing was not built ({error}). Build it with "
            "`pip install .` or `python setup.py build_ext --inplace`, or set "
            "GASPAR_NO_EXTENSIONS=1 to test only the pure-Python implementation."
        )


# -- Daemon fixtures ---------------------------------------------------------

import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gaspar  # noqa: E402

# The TMPDIR of every child process the tests start. A daemon that a test
# kills with SIGKILL cannot remove its runtime directory, so the session does.
SUBPROCESS_TMPDIR = tempfile.mkdtemp(prefix="gaspar-tests-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SUBPROCESS_TMPDIR, ignore_errors=True)


def descendant_pids(root_pid: int) -> list:
    """Return the pids of every living descendant of root_pid, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # The command name in parentheses may contain spaces; fields after it do not.
        fields = stat[stat.rindex(b")") + 2 :].split()
        state, parent = fields[0], int(fields[1])
        if state != b"Z":
            children.setdefault(parent, []).append(int(entry))

    found = []
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def wait_for(condition, timeout: float, message: str, interval: float = 0.01):
    """Poll condition() until it returns a true value; fail with message after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s: {message}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail a test that leaves a forked process behind, after killing it."""
    yield
    # A stopped producer has reaped everything; give subprocesses a moment to be reaped.
    deadline = time.monotonic() + 5
    leaked = descendant_pids(os.getpid())
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = descendant_pids(os.getpid())
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leaked:
        pytest.fail(f"test left processes running: {leaked}")


@pytest.fixture
def start_producer():
    """Return a function that starts a Producer on a free port, stopped after the test.

    Takes the Producer's arguments after the consumer; processes defaults to 2.
    """
    producers = []

    def start(consumer, **options):
        options.setdefault("processes", 2)
        options.setdefault("startup_timeout", 30.0)
        producer = gaspar.Producer(consumer, 0, **options)
        producers.append(producer)
        producer.start(blocking=False)
        return producer

    yield start
    for producer in producers:
        producer.stop(timeout=30)


def subprocess_env(**overrides) -> dict:
    """Return an environment in which a child Python imports the gaspar under test.

    The tests may run against an installed package or an in-place build; the
    child gets the same one through PYTHONPATH. Its temporary files go to
    SUBPROCESS_TMPDIR.
    """
    package_parent = os.path.dirname(os.path.dirname(gaspar.__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env["TMPDIR"] = SUBPROCESS_TMPDIR
    env.update(overrides)
    return env


# -- /proc helpers -----------------------------------------------------------


def stat_fields(pid: int) -> list:
    """Return the fields of /proc/PID/stat after the command name: state, parent pid, and so on."""
    with open(f"/proc/{pid}/stat", "rb") as stat_file:
        stat = stat_file.read()
    # The command name in parentheses may contain spaces; the fields after it do not.
    return stat[stat.rindex(b")") + 2 :].split()


def process_gone(pid: int) -> bool:
    """Return whether a process has exited: no /proc entry, or a zombie waiting to be reaped."""
    try:
        return stat_fields(pid)[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: the process exited between open() and read().
        return True


def parent_pid(pid: int) -> int:
    """Return the parent pid of a process, from /proc."""
    return int(stat_fields(pid)[1])


def start_time(pid: int):
    """Return a process's start time in clock ticks after boot, or None if it has no /proc entry.

    A pid and its start time together name one process even after the pid is reused.
    """
    try:
        return int(stat_fields(pid)[19])
    except (FileNotFoundError, ProcessLookupError):
        return None


def record_process_tree(root_pid: int, tree: dict) -> None:
    """Add each living descendant of root_pid to tree, as pid -> start time."""
    for pid in descendant_pids(root_pid):
        tree.setdefault(pid, start_time(pid))


def kill_process_tree(process, tree: dict) -> None:
    """SIGKILL a subprocess and every process recorded in tree; wait until all are gone.

    Orphans are reparented away from this process once ``process`` dies, so
    they are killed by their recorded pid, and only while that pid still has
    its recorded start time (a reused pid belongs to another process).
    """
    if process.poll() is None:
        record_process_tree(process.pid, tree)
        process.kill()
    process.wait()
    for pid, started in tree.items():
        if not process_gone(pid) and start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_for(
        lambda: all(process_gone(pid) or start_time(pid) != started for pid, started in tree.items()),
        10,
        f"the processes {sorted(tree)} to end",
    )
