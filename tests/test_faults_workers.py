"""Fault-injection tests of workers and of the daemon process.

Each test breaks one thing on purpose. The faults are handlers that raise,
hang, leak memory or kill their own process, workers killed from outside and
replacement workers that cannot start. At the process level they are a
producer killed with SIGKILL and a daemon that receives SIGTERM or SIGINT.
Each test checks what happens to the faulty request and that the healthy
requests sent at the same time still succeed. Everything runs on 127.0.0.1
with real worker processes and real 0MQ sockets.
"""

import concurrent.futures
import http.client
import ctypes
import faulthandler
import functools
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import gaspar
import gaspar._worker
import gaspar._supervisor
from gaspar import _messages, client
from gaspar._rejections import HANDLER_ERROR, TIMEOUT, WORKER_DIED

from conftest import descendant_pids, kill_process_tree, parent_pid, process_gone, record_process_tree, subprocess_env, wait_for

MIB = 1024 * 1024

# Blocks held by the "grow" command, so a worker's resident memory keeps growing.
MEMORY_HOG = []

# A lock that a test thread holds while a replacement worker starts (see LockingConsumer).
SETUP_LOCK = threading.Lock()


def handle_command(message: bytes) -> bytes:
    """Carry out the command a request starts with, then reply "pid:request".

    Commands: "sleep MS", "raise", "exit" (exit code 3), "segfault", "grow"
    (keep 30 MiB more), "rss" (reply with the resident memory in bytes).
    Anything else is echoed.
    """
    command, _, argument = message.partition(b" ")
    if command == b"sleep":
        time.sleep(int(argument.split(b" ", 1)[0]) / 1000)
    elif command == b"raise":
        raise ValueError("injected handler failure")
    elif command == b"exit":
        os._exit(3)
    elif command == b"segfault":
        # Write no core file, and turn off the faulthandler that pytest enables,
        # which would print this worker's traceback to the terminal.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        faulthandler.disable()
        ctypes.string_at(0)
    elif command == b"grow":
        # Multiplying writes every page, so all 30 MiB become resident.
        MEMORY_HOG.append(b"\x01" * (30 * MIB))
    elif command == b"rss":
        return b"%d" % gaspar._worker.resident_memory()
    return b"%d:%s" % (os.getpid(), message)


def served_by(reply: bytes) -> int:
    """Return the pid of the worker that sent a reply of handle_command()."""
    return int(reply.split(b":", 1)[0])


def timed_request(address: str, message: bytes):
    """Send one request; return (reply or the exception raised, time.monotonic() when it ended)."""
    try:
        outcome = client.request(address, message, timeout=30)
    except (OSError, gaspar.GasparError) as exc:
        outcome = exc
    return outcome, time.monotonic()


def failed_outcomes(futures) -> list:
    """Return every outcome of timed_request futures that is not a reply."""
    outcomes = [future.result()[0] for future in futures]
    return [outcome for outcome in outcomes if not isinstance(outcome, bytes)]


def live_workers(producer) -> list:
    """Return the producer's live workers; safe from any thread."""
    return producer.forker.processes


def wait_settled(producer, count: int) -> list:
    """Wait until exactly ``count`` workers run, all are ready and no replacement is pending; return them.

    Tests end with this so the producer does not stop while a replacement
    is starting: see test_stop_during_worker_boot. Every restart forks one
    worker with the next worker id, so the newest worker's id is ``count``
    plus the restarts once the last replacement has been forked. This holds
    only for tests without boot failures, whose retries fork without counting.
    """

    def settled_workers():
        restarts = producer.stats()["worker_restarts"]
        workers = live_workers(producer)
        if len(workers) != count or not all(worker.ready for worker in workers):
            return None
        if max(worker.worker_id for worker in workers) != count + restarts:
            return None
        return workers

    return wait_for(settled_workers, 10, f"{count} ready workers and no replacement pending")


def busy_workers(producer) -> list:
    """Return the live workers that hold at least one request."""
    return [worker for worker in live_workers(producer) if worker.in_flight]


def log_messages(caplog, pattern: str) -> list:
    """Return the messages of captured log records that match a regular expression."""
    return [record.getMessage() for record in caplog.records if re.search(pattern, record.getMessage())]










class StderrWriter:
    """A text stream that writes to whatever file descriptor 2 is when each record is logged."""

    def write(self, text: str) -> None:
        os.write(2, text.encode())

    def flush(self) -> None:
        pass


@pytest.fixture
def worker_stderr():
    """Send gaspar's log records to file descriptor 2, which capfd reads, so tests see the workers' logs.

    A worker inherits this handler through fork(). The handlers pytest
    installs keep records in the memory of the process that logs them, so
    records logged by a worker would be lost without it. sys.stderr is not
    used because capfd replaces it only after fixtures are set up.
    """
    logger = logging.getLogger("gaspar")
    handler = logging.StreamHandler(StderrWriter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)


# -- Handler raises ------------------------------------------------------------


def test_handler_raise_keeps_worker(start_producer, worker_stderr, capfd, caplog):
    caplog.set_level(logging.INFO, logger="gaspar")
    producer = start_producer(handle_command, processes=1)
    (worker,) = live_workers(producer)

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        faulty = pool.submit(timed_request, producer.address, b"raise")
        healthy = [pool.submit(timed_request, producer.address, b"sleep 20 healthy %d" % i) for i in range(5)]
        faulty_outcome, _ = faulty.result()
        healthy_failures = failed_outcomes(healthy)
        healthy_pids = {served_by(future.result()[0]) for future in healthy}

    assert isinstance(faulty_outcome, gaspar.RequestFailed)
    assert healthy_failures == []
    assert healthy_pids == {worker.pid}
    assert served_by(client.request(producer.address, b"after the failure", timeout=10)) == worker.pid
    assert producer.stats()["failed"] == {HANDLER_ERROR: 1}
    assert producer.stats()["worker_restarts"] == 0

    # The worker's traceback and the producer's rejection name the same request id.
    rejections = log_messages(caplog, r"rejected a request: handler raised \(request \d+ on worker")
    assert len(rejections) == 1
    request_id = re.search(r"request (\d+) on worker", rejections[0]).group(1)
    stderr = capfd.readouterr().err
    assert f"worker {worker.worker_id} (pid {worker.pid}): handler failed on request {request_id}\n" in stderr
    assert "ValueError: injected handler failure" in stderr


# -- Worker dies -----------------------------------------------------------------

DEATHS = {
    "exit": (b"exit", "exited with code 3"),
    "sigkill": (b"sleep 20000 doomed", "was killed by signal SIGKILL"),
    "segfault": (b"segfault", "was killed by signal SIGSEGV"),
}


@pytest.mark.parametrize("death", list(DEATHS))
def test_worker_death_fails_its_request(start_producer, caplog, death):
    """A worker that dies fails exactly the request it held, at once, and is replaced.

    The "sigkill" case also covers the kernel's OOM killer, which ends a
    process with the same SIGKILL.
    """
    caplog.set_level(logging.INFO, logger="gaspar")
    message, exit_description = DEATHS[death]
    producer = start_producer(handle_command, processes=2)
    original_pids = {worker.pid for worker in live_workers(producer)}

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        survivor = pool.submit(timed_request, producer.address, b"sleep 1500 survivor")
        (survivor_worker,) = wait_for(lambda: busy_workers(producer), 10, "the survivor request to be dispatched")
        # The doomed request goes to the only idle worker. It is looked up now because
        # "exit" and "segfault" end it, and its replacement may appear, before a later lookup.
        (doomed_worker,) = [worker for worker in live_workers(producer) if worker is not survivor_worker]
        sent_at = time.monotonic()
        doomed = pool.submit(timed_request, producer.address, message)
        if death == "sigkill":
            wait_for(lambda: len(busy_workers(producer)) == 2, 10, "both workers to hold a request")
            sent_at = time.monotonic()
            os.kill(doomed_worker.pid, signal.SIGKILL)
        # Both workers are busy or dead, so these wait in the daemon's queue or
        # behind a worker's current request, and must not be failed.
        queued = [pool.submit(timed_request, producer.address, b"sleep 10 queued %d" % i) for i in range(5)]

        doomed_outcome, failed_at = doomed.result()
        survivor_outcome, _ = survivor.result()
        queued_failures = failed_outcomes(queued)

    assert isinstance(doomed_outcome, gaspar.RequestFailed)
    # For "exit" and "segfault" the clock starts when the request is sent, before the death.
    assert failed_at - sent_at < 1.0
    assert isinstance(survivor_outcome, bytes)
    assert served_by(survivor_outcome) == survivor_worker.pid
    assert queued_failures == []
    assert producer.stats()["failed"] == {WORKER_DIED: 1}

    wait_settled(producer, 2)
    live_pids = {worker.pid for worker in live_workers(producer)}
    assert doomed_worker.pid not in live_pids
    assert len(live_pids - original_pids) == 1
    assert producer.stats()["worker_restarts"] == 1

    worker_name = f"worker {doomed_worker.worker_id} (pid {doomed_worker.pid})"
    died = log_messages(caplog, re.escape(f"{worker_name} died;"))
    # Requests queued at the dead worker, if any, went to the other worker.
    assert len(died) == 1
    assert re.fullmatch(
        re.escape(f"{worker_name} died; 1 request it held failed with it")
        + r"(; \d+ requests? it had not started went back to the queue)?",
        died[0],
    ), died
    exited = wait_for(
        lambda: log_messages(caplog, re.escape(f"{worker_name} {exit_description}")), 10, "the exit status log line"
    )
    assert len(exited) == 1


class FailingReplacementConsumer(gaspar.Consumer):
    """A consumer of handle_command() whose setup() raises once a marker file exists."""

    def __init__(self, marker) -> None:
        super().__init__(handler=handle_command)
        self.marker = marker

    def setup(self) -> None:
        if self.marker.exists():
            raise RuntimeError(f"injected setup failure: {self.marker} exists")


def test_replacement_boot_failure_stops(start_producer, caplog, monkeypatch, tmp_path):
    caplog.set_level(logging.INFO, logger="gaspar")
    monkeypatch.setattr(gaspar._supervisor, "BOOT_RETRY_DELAY", 0.05)
    marker = tmp_path / "fail-setup"
    producer = start_producer(FailingReplacementConsumer(marker), processes=2)
    victim, survivor = live_workers(producer)

    marker.touch()
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: log_messages(caplog, "retrying in"), 10, "the first retry")
    # The surviving worker serves while the replacements fail.
    healthy = [timed_request(producer.address, b"healthy %d" % i)[0] for i in range(5)]

    assert producer.stopped.wait(20)
    assert [served_by(reply) for reply in healthy] == [survivor.pid] * 5
    assert not producer.running.is_set()

    retries = [record for record in caplog.records if "retrying in" in record.getMessage()]
    # Every failure but the last is retried.
    assert len(retries) == gaspar._supervisor.MAX_BOOT_FAILURES - 1
    # The retry delay doubles each time; record.created is when the line was logged.
    for number, (earlier, later) in enumerate(zip(retries, retries[1:])):
        assert later.created - earlier.created >= 0.05 * 2**number
    gave_up = log_messages(
        caplog, r"^stopping: .*before it was ready; 5 rounds of workers in a row failed to start, giving up$"
    )
    assert len(gave_up) == 1
    gave_up_record = [record for record in caplog.records if record.getMessage() == gave_up[0]][0]
    assert gave_up_record.levelno == logging.ERROR
    with pytest.raises(ConnectionRefusedError):
        client.request(producer.address, b"after giving up", timeout=5)


# -- Handler hangs ---------------------------------------------------------------


def test_handler_timeout_replaces_worker(start_producer, caplog):
    caplog.set_level(logging.INFO, logger="gaspar")
    producer = start_producer(handle_command, processes=2, timeout=0.5)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        started = time.monotonic()
        hung = pool.submit(timed_request, producer.address, b"sleep 30000 hang")
        (hung_worker,) = wait_for(lambda: busy_workers(producer), 10, "the hanging request to be dispatched")
        healthy = [pool.submit(timed_request, producer.address, b"sleep 50 healthy %d" % i) for i in range(12)]
        hung_outcome, failed_at = hung.result()
        healthy_failures = failed_outcomes(healthy)

    assert isinstance(hung_outcome, gaspar.RequestFailed)
    assert failed_at - started >= 0.5
    assert failed_at - started < 3.0
    assert healthy_failures == []
    assert producer.stats()["failed"] == {TIMEOUT: 1}

    wait_settled(producer, 2)
    assert hung_worker.pid not in {worker.pid for worker in live_workers(producer)}
    worker_name = f"worker {hung_worker.worker_id} (pid {hung_worker.pid})"
    killed = log_messages(caplog, re.escape(f"ran past the 0.5 s timeout on {worker_name}; killing the worker"))
    assert len(killed) == 1


# -- Leaks: max_requests and max_worker_memory ------------------------------------


def test_max_requests_rotates_workers(start_producer):
    producer = start_producer(handle_command, processes=2, max_requests=5, max_requests_jitter=0)
    live_counts = []
    done = threading.Event()

    def sample_live_workers():
        while not done.is_set():
            live_counts.append(len(live_workers(producer)))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_live_workers)
    sampler.start()
    try:
        sequential = [timed_request(producer.address, b"sequential %d" % i)[0] for i in range(20)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            messages = [b"sleep 5 concurrent %d" % i for i in range(20)]
            results = pool.map(functools.partial(timed_request, producer.address), messages)
            concurrent_outcomes = [outcome for outcome, _ in results]
    finally:
        done.set()
        sampler.join()

    outcomes = sequential + concurrent_outcomes
    assert [outcome for outcome in outcomes if not isinstance(outcome, bytes)] == []
    assert producer.stats()["failed"] == {}
    serving_pids = {served_by(reply) for reply in outcomes}
    assert len(serving_pids) >= 4
    assert producer.stats()["worker_restarts"] >= 3
    assert min(live_counts) >= 2
    wait_settled(producer, 2)


def test_forker_processes_thread_safe(start_producer):
    # max_requests=1 replaces a worker after every request, so the dict changes often.
    producer = start_producer(handle_command, processes=2, max_requests=1, max_requests_jitter=0)
    errors = []
    done = threading.Event()

    def read_processes():
        while not done.is_set() and not errors:
            try:
                producer.forker.processes
            except RuntimeError as exc:
                errors.append(exc)

    reader = threading.Thread(target=read_processes)
    reader.start()
    try:
        for i in range(100):
            if errors:
                break
            timed_request(producer.address, b"churn %d" % i)
    finally:
        done.set()
        reader.join()

    assert errors == []


def test_stop_during_worker_boot(monkeypatch):
    """stop() while a replacement worker is starting returns without waiting for kill_timeout.

    max_requests=1 makes the reply to the request fork a replacement, and
    stop() right after the reply reaches that replacement while it starts.
    The worker's first call, die_with_parent(), is slowed by 0.3 s to imitate
    a loaded machine, so the SIGTERM always arrives before the worker has
    installed its SIGTERM handler.
    """
    die_with_parent = gaspar._worker.die_with_parent

    def slow_die_with_parent():
        time.sleep(0.3)
        die_with_parent()

    monkeypatch.setattr(gaspar._worker, "die_with_parent", slow_die_with_parent)
    producer = gaspar.Producer(handle_command, 0, processes=1, max_requests=1, max_requests_jitter=0, kill_timeout=3)
    producer.start(blocking=False)
    try:
        reply = client.request(producer.address, b"last request", timeout=10)
    finally:
        started = time.monotonic()
        producer.stop(timeout=30)
        stop_seconds = time.monotonic() - started

    assert reply.endswith(b":last request")
    assert stop_seconds < 1.5


def test_max_worker_memory_replaces_worker(start_producer):
    # The limit must be known before start(), so a first producer measures a fresh worker.
    probe = start_producer(handle_command, processes=1)
    fresh_rss_mib = int(client.request(probe.address, b"rss", timeout=10)) // MIB
    probe.stop(timeout=30)

    producer = start_producer(handle_command, processes=2, max_worker_memory=fresh_rss_mib + 50)
    original_pids = {worker.pid for worker in live_workers(producer)}

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        healthy = [pool.submit(timed_request, producer.address, b"sleep 20 healthy %d" % i) for i in range(10)]
        # Two requests, 60 MiB, put a worker above the limit; six reach both workers.
        growing = [timed_request(producer.address, b"grow %d" % i)[0] for i in range(6)]
        healthy_failures = failed_outcomes(healthy)

    assert [outcome for outcome in growing if not isinstance(outcome, bytes)] == []
    assert healthy_failures == []
    assert producer.stats()["failed"] == {}
    assert producer.stats()["worker_restarts"] >= 1
    live_pids = {worker.pid for worker in wait_settled(producer, 2)}
    assert original_pids - live_pids
    served_after = served_by(client.request(producer.address, b"after the limit", timeout=10))
    assert served_after in live_pids


# -- Worker startup while the producer's process runs threads -------------------


class LockingConsumer(gaspar.Consumer):
    """A consumer of handle_command() whose setup() takes SETUP_LOCK, as a library's init may take its own lock."""

    def setup(self) -> None:
        if not SETUP_LOCK.acquire(timeout=5):
            raise RuntimeError("SETUP_LOCK is held: this worker was forked while another thread held it")
        SETUP_LOCK.release()


def test_replacement_ignores_thread_locks(start_producer, caplog):
    """A replacement forked while a thread of the producer's process holds a lock can take that lock.

    Workers are forked by the fork server, which was forked before the
    thread took the lock. A worker forked from the producer itself would
    inherit the lock still held, and its setup() would time out after 5 s.
    """
    caplog.set_level(logging.INFO, logger="gaspar")
    producer = start_producer(LockingConsumer(handler=handle_command), processes=2)
    victim, survivor = live_workers(producer)
    lock_taken = threading.Event()
    release_lock = threading.Event()

    def hold_lock():
        with SETUP_LOCK:
            lock_taken.set()
            release_lock.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert lock_taken.wait(5)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        # Once this is logged, no request goes to the killed worker.
        wait_for(lambda: log_messages(caplog, re.escape(f"(pid {victim.pid}) died;")), 5, "the death to be logged")
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            healthy = [pool.submit(timed_request, producer.address, b"sleep 20 healthy %d" % i) for i in range(8)]
            (replacement,) = wait_for(
                lambda: [worker for worker in live_workers(producer) if worker.ready and worker is not survivor],
                10,
                "the replacement worker to become ready",
            )
            ready_seconds = time.monotonic() - killed_at
            healthy_failures = failed_outcomes(healthy)
        # Idle workers take requests in turn, so two sequential requests reach both.
        after_pids = {served_by(timed_request(producer.address, b"after %d" % i)[0]) for i in range(2)}
    finally:
        release_lock.set()
        holder.join()

    assert ready_seconds < 4.5
    assert healthy_failures == []
    assert replacement.pid in after_pids
    assert producer.stats()["failed"] == {}


# -- Daemon processes: SIGKILL, SIGTERM and SIGINT --------------------------------

DAEMON_SCRIPT = textwrap.dedent(
    """
    import logging
    import os
    import sys
    import time

    import gaspar

    graceful_timeout = float(sys.argv[1])
    started_dir = sys.argv[2]


    def sleep_then_echo(message):
        # "MS NAME": create the file NAME in started_dir, sleep MS milliseconds, echo the request.
        milliseconds, name = message.split(b" ", 1)
        open(os.path.join(started_dir, name.decode()), "w").close()
        time.sleep(int(milliseconds) / 1000)
        return message


    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    gaspar.Producer(sleep_then_echo, 0, processes=2, graceful_timeout=graceful_timeout, metrics_port=0).start()
    """
)


class Daemon:
    """A blocking gaspar daemon in a child Python process, with its log lines read by a thread."""

    def __init__(self, directory, graceful_timeout: float) -> None:
        script = directory / "serve.py"
        script.write_text(DAEMON_SCRIPT)
        self.started_dir = directory / "started"
        self.started_dir.mkdir()
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(graceful_timeout), str(self.started_dir)],
            stderr=subprocess.PIPE,
            env=subprocess_env(),
        )
        self.lines = []
        # pid -> start time of the daemon's fork server and workers, to kill them by pid in close().
        self.tree = {}
        self._reader = threading.Thread(target=self._read_lines, daemon=True)
        self._reader.start()
        self.address = None
        self.worker_pids = []

    def wait_listening(self) -> None:
        """Wait for the "listening on" line; learn the address and the worker pids."""
        listening = self.wait_for_line(r"listening on (\S+)", 30)
        self.address = listening.group(1)
        self.metrics_address = self.wait_for_line(r"serving metrics at http://(\S+)/metrics", 10).group(1)
        self.worker_pids = [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) ready", self.log_text())]
        self._record_tree()

    def metric(self, name: str) -> float:
        """Return the value of an unlabelled metric from the daemon's /metrics endpoint."""
        host, _, port = self.metrics_address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("GET", "/metrics")
            body = connection.getresponse().read().decode()
        finally:
            connection.close()
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} not found in:\n{body}")

    def _record_tree(self) -> None:
        record_process_tree(self.process.pid, self.tree)

    def _read_lines(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.decode(errors="replace"))

    def log_text(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float):
        """Return the match of the first log line that matches a regular expression; fail after timeout seconds."""

        def find():
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                pytest.fail(
                    f"the daemon exited with {self.process.returncode} before logging {pattern!r}:\n{self.log_text()}"
                )
            return None

        return wait_for(find, timeout, f"a daemon log line matching {pattern!r} (the log is printed at teardown)")

    def wait_started(self, name: str, timeout: float = 10) -> None:
        """Wait until the handler has started the request named ``name``."""
        wait_for(lambda: (self.started_dir / name).exists(), timeout, f"the handler to start request {name!r}")

    def exit_code(self, timeout: float):
        """Return the exit code once the process exits, or None if it still runs after timeout seconds."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """SIGKILL the daemon, its fork server and its workers, wait until all are gone, and print the log."""
        try:
            kill_process_tree(self.process, self.tree)
        finally:
            self._reader.join(10)
            self.process.stderr.close()
            print(f"daemon log:\n{self.log_text()}")


@pytest.fixture
def run_daemon(tmp_path):
    """Return a function that starts a Daemon; every Daemon is killed after the test."""
    daemons = []

    def run(graceful_timeout: float = 30.0) -> Daemon:
        directory = tmp_path / f"daemon-{len(daemons)}"
        directory.mkdir()
        daemon = Daemon(directory, graceful_timeout)
        daemons.append(daemon)
        daemon.wait_listening()
        return daemon

    yield run
    for daemon in daemons:
        daemon.close()


def test_producer_sigkill_ends_workers(run_daemon):
    daemon = run_daemon()
    assert len(daemon.worker_pids) == 2
    fork_server_pid = parent_pid(daemon.worker_pids[0])
    assert parent_pid(daemon.worker_pids[1]) == fork_server_pid
    assert parent_pid(fork_server_pid) == daemon.process.pid
    assert client.request(daemon.address, b"0 before", timeout=10) == b"0 before"

    daemon.process.kill()
    killed_at = time.monotonic()
    assert daemon.exit_code(5) == -signal.SIGKILL
    orphans = [fork_server_pid] + daemon.worker_pids
    wait_for(lambda: all(process_gone(pid) for pid in orphans), 2, f"the fork server and workers {orphans} to end")
    assert time.monotonic() - killed_at < 2.5


def test_producer_sigkill_resets_clients(run_daemon):
    daemon = run_daemon()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(timed_request, daemon.address, b"3000 long")
        daemon.wait_started("long")
        daemon.process.kill()
        outcome, _ = in_flight.result()

    assert isinstance(outcome, gaspar.RequestFailed)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_daemon_signal_drains(run_daemon, signum):
    daemon = run_daemon(graceful_timeout=10)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(timed_request, daemon.address, b"1000 slow")
        daemon.wait_started("slow")
        signalled_at = time.monotonic()
        daemon.process.send_signal(signum)
        daemon.wait_for_line(f"{signum.name} received: stopping gracefully", 5)
        # The listener is closed before this line is logged.
        daemon.wait_for_line(r"stopping: 1 request in flight", 5)
        with pytest.raises(ConnectionRefusedError):
            client.request(daemon.address, b"0 late", timeout=5)
        outcome, _ = in_flight.result()

    assert outcome == b"1000 slow"
    assert daemon.exit_code(10) == 0
    assert time.monotonic() - signalled_at < 10


def test_daemon_second_sigterm_stops_now(run_daemon):
    daemon = run_daemon(graceful_timeout=30)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(timed_request, daemon.address, b"10000 long")
        daemon.wait_started("long")
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for_line(r"stopping: 1 request in flight", 5)
        second_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait_for_line("second SIGTERM received: stopping now", 5)
        outcome, failed_at = in_flight.result()

    assert isinstance(outcome, gaspar.RequestFailed)
    assert failed_at - second_at < 2.0
    assert daemon.exit_code(2.5) == 0


def test_daemon_graceful_timeout_expires(run_daemon):
    daemon = run_daemon(graceful_timeout=1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(timed_request, daemon.address, b"10000 long")
        daemon.wait_started("long")
        signalled_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        outcome, failed_at = in_flight.result()

    assert isinstance(outcome, gaspar.RequestFailed)
    assert failed_at - signalled_at >= 1.0
    assert failed_at - signalled_at < 3.0
    assert daemon.exit_code(max(0.0, 3.5 - (time.monotonic() - signalled_at))) == 0


# -- Stop and start again ---------------------------------------------------------


def os_thread_names() -> list:
    """Return the name of each OS thread of this process, from /proc/self/task."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm_file:
                names.append(comm_file.read().strip())
        except (FileNotFoundError, ProcessLookupError):
            # The thread ended after listdir().
            continue
    return names


def count_resources() -> dict:
    """Return the counts of this process's open fds, threads and descendant processes."""
    thread_names = os_thread_names()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "python threads": threading.active_count(),
        "os threads": len(thread_names),
        "0MQ threads": sum(name.startswith("ZMQbg/") for name in thread_names),
        "descendants": len(descendant_pids(os.getpid())),
    }


def count_settled_resources() -> dict:
    """Return count_resources() once every OS thread is a Python thread or a 0MQ thread, or after 5 s.

    A thread's OS thread can outlive Thread.join() by a moment. libzmq names
    its threads "ZMQbg/...": pyzmq's garbage collector keeps a context, and
    its threads, from the first zero-copy send to the end of the process.
    """
    deadline = time.monotonic() + 5
    counts = count_resources()
    while counts["os threads"] - counts["0MQ threads"] != counts["python threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
        counts = count_resources()
    return counts


@pytest.mark.parametrize("reuse", [True, False], ids=["same-producer", "new-producer"])
def test_restart_cycles_leak_nothing(reuse):
    producer = gaspar.Producer(handle_command, 0, processes=1)

    def run_cycle(number: int) -> bytes:
        nonlocal producer
        if not reuse:
            producer = gaspar.Producer(handle_command, 0, processes=1)
        producer.start(blocking=False)
        try:
            return client.request(producer.address, b"cycle %d" % number, timeout=10)
        finally:
            producer.stop(timeout=30)

    run_cycle(0)
    before = count_settled_resources()
    replies = [run_cycle(number) for number in range(1, 21)]
    after = count_settled_resources()

    assert [reply.split(b":", 1)[1] for reply in replies] == [b"cycle %d" % number for number in range(1, 21)]
    for resource_name in before:
        assert after[resource_name] == before[resource_name], resource_name


# -- Signals to workers and the whole process tree -------------------------------


def test_daemon_sighup_replaces_workers(run_daemon):
    daemon = run_daemon()
    old_pids = set(daemon.worker_pids)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        in_flight = [pool.submit(timed_request, daemon.address, b"800 hup-%d" % number) for number in range(4)]
        daemon.wait_started("hup-0")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_line(r"SIGHUP received: replacing all 2 workers", 10)
        failures = failed_outcomes(in_flight)

    assert failures == []
    new_ready = wait_for(
        lambda: [int(pid) for pid in re.findall(r"worker (?:3|4) \(pid (\d+)\) ready", daemon.log_text())],
        10,
        "two replacement workers",
    )
    assert len(new_ready) == 2
    assert set(new_ready).isdisjoint(old_pids)
    wait_for(lambda: all(process_gone(pid) for pid in old_pids), 10, "the old workers to exit")
    assert client.request(daemon.address, b"0 after-hup", timeout=10) == b"0 after-hup"
    assert daemon.process.poll() is None


def test_daemon_tree_sigterm_answers_all(run_daemon):
    """SIGTERM to every process of the daemon, as systemd's default KillMode sends it."""
    daemon = run_daemon()
    fork_server_pid = parent_pid(daemon.worker_pids[0])

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        # Two requests run and two wait, queued behind them at the workers.
        in_flight = [pool.submit(timed_request, daemon.address, b"1500 tree-%d" % number) for number in range(4)]
        # A connection still in the listen backlog at SIGTERM is refused, so
        # wait until the daemon has read all four requests.
        wait_for(
            lambda: daemon.metric("gaspar_requests_in_flight") + daemon.metric("gaspar_requests_queued") == 4,
            10,
            "four requests running or queued",
        )
        for pid in [daemon.process.pid, fork_server_pid] + daemon.worker_pids:
            os.kill(pid, signal.SIGTERM)
        failures = failed_outcomes(in_flight)

    assert failures == []
    assert daemon.exit_code(20) == 0


def test_worker_sigterm_replaced_gracefully(start_producer):
    producer = start_producer(handle_command, processes=2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(timed_request, producer.address, b"sleep 500 held")
        wait_for(lambda: busy_workers(producer), 10, "a worker to hold the request")
        holder = busy_workers(producer)[0]
        os.kill(holder.pid, signal.SIGTERM)
        outcome, _ = held.result()

    assert isinstance(outcome, bytes)
    assert served_by(outcome) == holder.pid
    wait_for(lambda: process_gone(holder.pid), 10, "the worker that received SIGTERM to exit")
    workers = wait_settled(producer, 2)
    assert holder.pid not in {worker.pid for worker in workers}
    assert producer.stats()["failed"] == {}


def test_handler_sys_exit_fails_request(start_producer):
    def exit_on_request(message):
        if message == b"exit":
            raise SystemExit(5)
        return b"%d" % os.getpid()

    producer = start_producer(exit_on_request, processes=1)
    before = client.request(producer.address, b"pid", timeout=10)

    with pytest.raises(gaspar.RequestFailed):
        client.request(producer.address, b"exit", timeout=10)

    assert client.request(producer.address, b"pid", timeout=10) == before


def test_simultaneous_boot_failures_one_round(start_producer, caplog, monkeypatch, tmp_path):
    """Replacements that fail together count as one round, so backoff still applies."""
    caplog.set_level(logging.INFO, logger="gaspar")
    monkeypatch.setattr(gaspar._supervisor, "BOOT_RETRY_DELAY", 0.1)
    marker = tmp_path / "fail-setup"
    producer = start_producer(FailingReplacementConsumer(marker), processes=3)
    workers = live_workers(producer)

    marker.touch()
    killed_at = time.monotonic()
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)

    assert producer.stopped.wait(30)
    # Four rounds of retries wait 0.1 + 0.2 + 0.4 + 0.8 s before the fifth failure.
    assert time.monotonic() - killed_at >= 1.5
    assert len(log_messages(caplog, "giving up")) == 1


# -- Requests queued at a worker (prefetch) -----------------------------------------


def test_prefetch_dead_worker_resends_unstarted(start_producer, caplog):
    caplog.set_level(logging.INFO, logger="gaspar")
    # One worker, so the healthy requests queue behind the doomed one at that worker.
    producer = start_producer(handle_command, processes=1, prefetch=4)
    (doomed_worker,) = live_workers(producer)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        doomed = pool.submit(timed_request, producer.address, b"sleep 20000 doomed")
        wait_for(lambda: busy_workers(producer), 10, "the doomed request to be dispatched")
        queued = [pool.submit(timed_request, producer.address, b"queued %d" % i) for i in range(3)]
        wait_for(lambda: len(doomed_worker.in_flight) == 4, 10, "the worker to hold all four requests")
        os.kill(doomed_worker.pid, signal.SIGKILL)
        doomed_outcome, _ = doomed.result()
        queued_outcomes = [future.result()[0] for future in queued]

    assert isinstance(doomed_outcome, gaspar.RequestFailed)
    assert all(isinstance(outcome, bytes) for outcome in queued_outcomes), queued_outcomes
    # The replacement worker served them.
    assert {served_by(outcome) for outcome in queued_outcomes} != {doomed_worker.pid}
    assert producer.stats()["failed"] == {WORKER_DIED: 1}

    wait_settled(producer, 1)
    worker_name = f"worker {doomed_worker.worker_id} (pid {doomed_worker.pid})"
    died = log_messages(caplog, re.escape(f"{worker_name} died;"))
    assert died == [f"{worker_name} died; 1 request it held failed with it; 3 requests it had not started went back to the queue"]


def test_prefetch_timeout_resends_queued(start_producer):
    producer = start_producer(handle_command, processes=1, prefetch=4, timeout=0.5)
    (hung_worker,) = live_workers(producer)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        hung = pool.submit(timed_request, producer.address, b"sleep 30000 hang")
        wait_for(lambda: busy_workers(producer), 10, "the hanging request to be dispatched")
        queued = [pool.submit(timed_request, producer.address, b"queued %d" % i) for i in range(3)]
        hung_outcome, _ = hung.result()
        queued_outcomes = [future.result()[0] for future in queued]

    assert isinstance(hung_outcome, gaspar.RequestFailed)
    assert all(isinstance(outcome, bytes) for outcome in queued_outcomes), queued_outcomes
    assert hung_worker.pid not in {served_by(outcome) for outcome in queued_outcomes}
    assert producer.stats()["failed"] == {TIMEOUT: 1}
    wait_settled(producer, 1)


def test_prefetch_timeout_counts_from_start(start_producer):
    # Each request runs 300 ms, under the 0.5 s timeout, but the last one
    # waits about 600 ms at the worker before it starts.
    producer = start_producer(handle_command, processes=1, prefetch=4, timeout=0.5)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(timed_request, producer.address, b"sleep 300 request %d" % i) for i in range(3)]
        outcomes = [future.result()[0] for future in futures]

    assert all(isinstance(outcome, bytes) for outcome in outcomes), outcomes
    assert producer.stats()["failed"] == {}


def test_prefetch_idle_worker_takes_queued_request(start_producer):
    producer = start_producer(handle_command, processes=2, prefetch=4, graceful_timeout=0.5)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        long = pool.submit(timed_request, producer.address, b"sleep 20000 long")
        wait_for(lambda: len(busy_workers(producer)) == 1, 10, "the long request to be dispatched")
        short = pool.submit(timed_request, producer.address, b"sleep 200 short")
        wait_for(lambda: len(busy_workers(producer)) == 2, 10, "the short request to be dispatched")
        # Both workers are busy, so these two queue at the workers, one behind each request.
        queued = [pool.submit(timed_request, producer.address, b"queued %d" % i) for i in range(2)]

        # The one queued behind the long request must move to the other
        # worker once that worker is idle, and not wait for the long request.
        for future in queued:
            outcome, _ = future.result(timeout=10)
            assert isinstance(outcome, bytes), outcome
        short_outcome, _ = short.result(timeout=10)
        long_still_running = not long.done()
        producer.stop(timeout=30)

    assert isinstance(short_outcome, bytes)
    assert long_still_running


def test_prefetch_crash_keeps_previous_reply(start_producer):
    # The worker finishes one request and crashes on the next, queued right
    # behind it. The first reply must have left the worker before the crash.
    producer = start_producer(handle_command, processes=1, prefetch=4)

    for round_number in range(10):
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            healthy = pool.submit(timed_request, producer.address, b"sleep 100 healthy %d" % round_number)
            wait_for(lambda: busy_workers(producer), 10, "the healthy request to be dispatched")
            doomed = pool.submit(timed_request, producer.address, b"exit")
            healthy_outcome, _ = healthy.result()
            doomed_outcome, _ = doomed.result()

        assert isinstance(healthy_outcome, bytes), (round_number, healthy_outcome)
        assert isinstance(doomed_outcome, gaspar.RequestFailed), (round_number, doomed_outcome)
        wait_settled(producer, 1)


def test_replacement_ready_before_spawned_serves_queue(start_producer, monkeypatch, tmp_path):
    # The fork server reports SPAWNED late once the marker exists, so the
    # replacement's READY reaches the producer first.
    marker = tmp_path / "delay-spawned"
    send_fds = socket.send_fds

    def late_send_fds(sock, buffers, fds, *args):
        if marker.exists():
            time.sleep(0.3)
        return send_fds(sock, buffers, fds, *args)

    monkeypatch.setattr(socket, "send_fds", late_send_fds)
    producer = start_producer(handle_command, processes=1)
    marker.write_bytes(b"")

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        doomed = pool.submit(timed_request, producer.address, b"exit")
        time.sleep(0.005)
        healthy = pool.submit(timed_request, producer.address, b"healthy")
        doomed_outcome, _ = doomed.result()
        healthy_outcome, _ = healthy.result()

    assert isinstance(doomed_outcome, gaspar.RequestFailed)
    assert isinstance(healthy_outcome, bytes), healthy_outcome
    marker.unlink()
    wait_settled(producer, 1)


def test_prefetch_timeout_spares_next_request(start_producer):
    # The first request ends near its deadline. When it ends just before,
    # the worker has started the second, which must not die with a kill
    # meant for the first.
    producer = start_producer(handle_command, processes=1, prefetch=4, timeout=0.2)

    for round_number in range(25):
        edge_ms = 196 + round_number % 9
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            edge = pool.submit(timed_request, producer.address, b"sleep %d edge" % edge_ms)
            time.sleep(0.02)
            healthy = pool.submit(timed_request, producer.address, b"sleep 10 healthy %d" % round_number)
            edge.result()
            healthy_outcome, _ = healthy.result()

        assert isinstance(healthy_outcome, bytes), (round_number, healthy_outcome)
        wait_settled(producer, 1)


def test_stop_fails_unstarted_when_last_worker_dies(start_producer):
    producer = start_producer(handle_command, processes=1, prefetch=4, graceful_timeout=20)
    (worker,) = live_workers(producer)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        running = pool.submit(timed_request, producer.address, b"sleep 300 running")
        wait_for(lambda: busy_workers(producer), 10, "the first request to be dispatched")
        doomed = pool.submit(timed_request, producer.address, b"exit")
        wait_for(lambda: len(worker.in_flight) == 2, 10, "the exit request to queue at the worker")
        queued = [pool.submit(timed_request, producer.address, b"queued %d" % i) for i in range(2)]
        wait_for(lambda: len(worker.in_flight) == 4, 10, "every request to queue at the worker")

        started = time.monotonic()
        producer.stop(timeout=30)
        stop_seconds = time.monotonic() - started
        running_outcome, _ = running.result()
        doomed_outcome, _ = doomed.result()
        queued_failures = failed_outcomes(queued)

    assert isinstance(running_outcome, bytes)
    assert isinstance(doomed_outcome, gaspar.RequestFailed)
    # No worker is left to run them, so they fail at once instead of at the graceful timeout.
    assert len(queued_failures) == 2
    assert stop_seconds < 10


def test_kept_reply_delivered_after_crash(start_producer, monkeypatch, caplog):
    # Workers fork from this process, so they inherit the patch: a reply
    # marked "lost" is kept in the claim record but never sent, and the
    # worker dies at once, as a crash inside 0MQ's I/O thread window would.
    caplog.set_level(logging.INFO, logger="gaspar")
    send = gaspar._worker.WorkerLoop._send

    def send_or_crash(self, replies, kind, value, body=b""):
        if kind == _messages.REPLY and b":lost" in bytes(body):
            os._exit(1)
        send(self, replies, kind, value, body)

    monkeypatch.setattr(gaspar._worker.WorkerLoop, "_send", send_or_crash)
    producer = start_producer(handle_command, processes=1)
    (worker,) = live_workers(producer)

    outcome, _ = timed_request(producer.address, b"lost reply")

    assert isinstance(outcome, bytes), outcome
    assert outcome == b"%d:lost reply" % worker.pid
    assert producer.stats()["failed"] == {}
    delivered = log_messages(caplog, "from its claim record")
    assert len(delivered) == 1
    wait_settled(producer, 1)
