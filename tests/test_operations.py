"""Tests of what an operator relies on: lifecycle, startup errors, metrics, signals, logs and the CLI.

The in-process tests use Producer directly: as a context manager, with
start() failing fast on a taken port or a broken setup(), and with its
Prometheus endpoint checked against stats(). The daemon tests run
``python -m gaspar serve`` as a real subprocess on 127.0.0.1, with handler
modules written to the test's temporary directory, and drive it with signals
while a few client threads send requests. Every load loop stops by itself
after a bounded number of requests and seconds.
"""

import concurrent.futures
import datetime
import http.client
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import pytest

import gaspar
import gaspar.examples
from gaspar import client

from conftest import descendant_pids, kill_process_tree, process_gone, record_process_tree, subprocess_env, wait_for

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Handlers served by `gaspar serve` in these tests, from a module on the child's PYTHONPATH.
HANDLERS_SOURCE = '''
"""Handlers for the daemon tests of tests/test_operations.py."""

import os
import time


def pid_echo(message):
    """Reply with the worker's pid, a colon and the request."""
    return b"%d:%s" % (os.getpid(), message)


def echo_or_raise(message):
    """Echo the request, or raise ValueError when it is b"raise"."""
    if message == b"raise":
        raise ValueError("injected handler failure")
    return message


def mark_then_sleep(message):
    """Create the file whose path is the request, sleep 1.5 s, reply b"done"."""
    with open(message, "wb"):
        pass
    time.sleep(1.5)
    return b"done"
'''

# A handler whose code version shows in each reply; the rolling restart tests rewrite VERSION_TAG.
VERSIONED_SOURCE = '''
"""A handler that the rolling restart tests rewrite between versions."""

import os
import time


def handle(message):
    """Use 3 ms of CPU, so workers hold requests when they are replaced; reply b"VERSION:PID:request"."""
    deadline = time.perf_counter() + 0.003
    while time.perf_counter() < deadline:
        pass
    return b"VERSION_TAG:%d:%s" % (os.getpid(), message)
'''

LISTENING = re.compile(r"listening on (\S+) with (\d+) workers?\b")
READY = re.compile(r"worker (\d+) \(pid (\d+)\) ready")
METRICS_URL = re.compile(r"serving metrics at http://(\S+):(\d+)/metrics")
# A text log line: date, time, [pid], level, logger: message.
TEXT_LOG_LINE = re.compile(r"^\S+ \S+ \[(\d+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
JSON_LOG_KEYS = {"time", "level", "logger", "pid", "message"}


def echo_or_raise(message: bytes) -> bytes:
    """Echo the request, or raise ValueError when it is b"raise"."""
    if message == b"raise":
        raise ValueError("injected handler failure")
    return message


def request_outcome(address: str, message: bytes):
    """Send one request and return its reply, or the exception it raised."""
    try:
        return client.request(address, message, timeout=10)
    except (OSError, gaspar.GasparError) as exc:
        return exc


def send_oversized_header(address, declared_size: int):
    """Send only a header that declares ``declared_size`` bytes, then return the exception that reading raised, or the bytes read."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(struct.pack("!I", declared_size))
        try:
            return sock.recv(1)
        except OSError as exc:
            return exc


# -- Processes -----------------------------------------------------------------








def handler_env(directory=None) -> dict:
    """Return an environment for a gaspar child that imports gaspar and, if given, modules from ``directory``.

    The caller's GASPAR_* variables are dropped, so only the command line sets options.
    """
    env = {name: value for name, value in subprocess_env().items() if not name.startswith("GASPAR_")}
    if directory is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(directory), env["PYTHONPATH"]])
    return env


def write_handlers(directory) -> dict:
    """Write the module ops_handlers into ``directory`` and return an environment that imports it."""
    (directory / "ops_handlers.py").write_text(HANDLERS_SOURCE)
    return handler_env(directory)


def rewrite_module(path, source: str) -> None:
    """Replace a module's source so that importlib.reload() compiles the new code.

    The bytecode cache is valid while the source's size and mtime, in whole
    seconds, are unchanged. Both versions have the same size and may be
    written within one second, so the mtime moves on by 10 s.
    """
    mtime = path.stat().st_mtime
    path.write_text(source)
    os.utime(path, (mtime + 10, mtime + 10))


class ServeDaemon:
    """A ``python -m gaspar serve`` subprocess whose standard error a thread collects line by line."""

    def __init__(self, arguments, env) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gaspar", "serve", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines = []
        # pid -> start time of the daemon's fork server and workers, to kill them by pid in close().
        self.tree = {}
        self.address = None
        self._reader = threading.Thread(target=self._read_lines, daemon=True)
        self._reader.start()

    def _read_lines(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def matches(self, pattern: str) -> list:
        """Return the match of every log line that matches a regular expression, in order."""
        found = (re.search(pattern, line) for line in list(self.lines))
        return [match for match in found if match]

    def wait_for_matches(self, pattern: str, count: int, timeout: float) -> list:
        """Wait until ``count`` log lines match a regular expression, then return their matches."""

        def find():
            found = self.matches(pattern)
            if len(found) >= count:
                return found[:count]
            if self.process.poll() is not None and not self._reader.is_alive():
                pytest.fail(f"gaspar serve exited with {self.process.returncode} before logging {pattern!r}:\n{self.log_text()}")
            return None

        return wait_for(find, timeout, f"{count} log lines matching {pattern!r}; log:\n{self.log_text()}")

    def wait_for_line(self, pattern: str, timeout: float = 10):
        """Return the match of the first log line that matches a regular expression; fail after timeout seconds."""
        return self.wait_for_matches(pattern, 1, timeout)[0]

    def wait_listening(self) -> None:
        self.address = self.wait_for_line(LISTENING.pattern, 30).group(1)
        self.record_tree()

    def ready_pids(self) -> dict:
        """Return {worker id: pid} of every worker logged as ready so far."""
        return {int(match.group(1)): int(match.group(2)) for match in self.matches(READY.pattern)}

    def metrics_addr(self):
        match = self.wait_for_line(METRICS_URL.pattern)
        return match.group(1), int(match.group(2))

    def signal_and_wait(self, signum: int, pattern: str, timeout: float = 10):
        """Send a signal and wait for the log line that acknowledges it.

        Standard signals do not queue, so a second signal of a kind sent
        before the daemon handled the first could be lost.
        """
        self.process.send_signal(signum)
        return self.wait_for_line(pattern, timeout)

    def record_tree(self) -> None:
        record_process_tree(self.process.pid, self.tree)

    def stop(self, timeout: float = 20) -> int:
        """Send SIGTERM and return the exit status once the process and its log have ended."""
        self.record_tree()
        self.process.send_signal(signal.SIGTERM)
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        return returncode

    def close(self) -> None:
        """SIGKILL the daemon, its fork server and its workers, and wait until all are gone."""
        try:
            kill_process_tree(self.process, self.tree)
        finally:
            self._reader.join(10)
            self.process.stderr.close()
            print(f"gaspar serve log:\n{self.log_text()}")


@pytest.fixture
def serve_daemon():
    """Return a function that starts ``gaspar serve ARGUMENTS`` and waits until it listens. Every daemon is killed after the test."""
    daemons = []

    def start(*arguments, env) -> ServeDaemon:
        daemon = ServeDaemon(arguments, env)
        daemons.append(daemon)
        daemon.wait_listening()
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()


class Outcome(NamedTuple):
    started: float
    ended: float
    message: bytes
    # The reply, or the exception the request raised.
    reply: object


class Load:
    """Client threads that send requests back to back and record every outcome.

    Each thread stops at stop(), after ``seconds`` or after ``max_requests``
    requests, whichever comes first.
    """

    def __init__(self, address: str, threads: int = 3, seconds: float = 20.0, max_requests: int = 3000) -> None:
        self.address = address
        self.outcomes = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._max_requests = max_requests
        self._threads = [threading.Thread(target=self._run, args=(number,)) for number in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self, number: int) -> None:
        for sequence in range(self._max_requests):
            if self._stop.is_set() or time.monotonic() >= self._deadline:
                return
            message = b"load-%d-%d" % (number, sequence)
            started = time.monotonic()
            reply = request_outcome(self.address, message)
            self.outcomes.append(Outcome(started, time.monotonic(), message, reply))
            # A short pause leaves CPU time for the daemon to fork and import on 2 shared cores.
            time.sleep(0.002)

    def wait_for_more(self, count: int, seconds: float = 0.0, timeout: float = 10) -> None:
        """Wait until ``count`` more requests have ended than now, and at least ``seconds`` have passed."""
        target = len(self.outcomes) + count
        time.sleep(seconds)
        wait_for(lambda: len(self.outcomes) >= target, timeout, f"{count} more requests to end")

    def failures(self) -> list:
        return [outcome for outcome in self.outcomes if not isinstance(outcome.reply, bytes)]


def served_by(reply: bytes) -> int:
    """Return the pid in a reply of pid_echo, b"PID:request"."""
    return int(reply.split(b":", 1)[0])


# -- Metrics parsing and HTTP --------------------------------------------------------

SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict:
    """Parse the Prometheus text format into {(name, ((label, value), ...)): value}.

    Comment lines (# HELP, # TYPE) and blank lines are skipped. Labels are
    sorted by name, and label values keep their escapes.
    """
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE_LINE.match(line)
        if match is None:
            raise ValueError(f"invalid sample line in the metrics text: {line!r}")
        name, labels, value = match.groups()
        samples[(name, tuple(sorted(LABEL.findall(labels or ""))))] = float(value)
    return samples


def metric_types(text: str) -> dict:
    """Return {metric name: type} from the # TYPE lines."""
    return {name: kind for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)}


def samples_named(samples: dict, name: str) -> dict:
    """Return {labels as a dict's items: value} of every sample of one metric."""
    return {labels: value for (sample_name, labels), value in samples.items() if sample_name == name}


def http_get(address, path: str, method: str = "GET", body=None):
    """Send one HTTP request to (host, port) and return (status, Content-Type, body)."""
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def raw_http(address, data: bytes) -> bytes:
    """Send raw bytes to an HTTP endpoint and return everything it sends back before closing."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


# -- Context manager ------------------------------------------------------------------


def test_producer_context_manager_serves_then_stops():
    with gaspar.Producer(echo_or_raise, 0, processes=2, startup_timeout=30) as producer:
        running_inside = producer.running.is_set()
        address = producer.address
        reply = client.request(address, b"inside the block", timeout=10)
        # The fork server and two workers.
        children_inside = descendant_pids(os.getpid())

    assert running_inside
    assert reply == b"inside the block"
    assert len(children_inside) == 3
    assert producer.stopped.is_set()
    assert not producer.running.is_set()
    assert descendant_pids(os.getpid()) == []
    with pytest.raises(ConnectionRefusedError):
        client.request(address, b"after the block", timeout=10)


class DeployAborted(Exception):
    pass


def test_producer_context_manager_stops_on_error():
    with pytest.raises(DeployAborted, match="abort inside the block"):
        with gaspar.Producer(echo_or_raise, 0, processes=2, startup_timeout=30) as producer:
            reply = client.request(producer.address, b"before the error", timeout=10)
            raise DeployAborted("abort inside the block")

    assert reply == b"before the error"
    assert producer.stopped.is_set()
    assert not producer.running.is_set()
    assert descendant_pids(os.getpid()) == []


# -- StartupError -----------------------------------------------------------------------


def test_start_port_taken_raises():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        producer = gaspar.Producer(echo_or_raise, port, processes=1, startup_timeout=30)
        started = time.monotonic()
        with pytest.raises(gaspar.StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            producer.start(blocking=False)
        elapsed = time.monotonic() - started

    assert elapsed < 5
    assert not producer.running.is_set()
    assert descendant_pids(os.getpid()) == []


def test_start_metrics_port_taken_raises():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        producer = gaspar.Producer(echo_or_raise, 0, processes=1, startup_timeout=30, metrics_port=port)
        started = time.monotonic()
        with pytest.raises(gaspar.StartupError, match=f"cannot listen for metrics on 127.0.0.1:{port}"):
            producer.start(blocking=False)
        elapsed = time.monotonic() - started

    assert elapsed < 5
    assert producer.metrics_addr is None
    assert descendant_pids(os.getpid()) == []


class BrokenSetupConsumer(gaspar.Consumer):
    def setup(self) -> None:
        raise ConnectionError("injected setup failure: the database is down")

    def handle(self, message: bytes) -> bytes:
        return message


def test_start_setup_failure_raises():
    producer = gaspar.Producer(BrokenSetupConsumer(), 0, processes=2, startup_timeout=30)
    started = time.monotonic()

    with pytest.raises(gaspar.StartupError, match=r"worker \d+ \(pid \d+\)") as failure:
        producer.start(blocking=False)
    elapsed = time.monotonic() - started

    assert elapsed < 5
    assert "before it was ready" in str(failure.value)
    assert not producer.running.is_set()
    assert descendant_pids(os.getpid()) == []


# -- Metrics -------------------------------------------------------------------------------


def test_metrics_match_stats(start_producer):
    producer = start_producer(echo_or_raise, processes=2, max_request_size=64, metrics_port=0)
    address = producer.address

    replies = [client.request(address, b"ok %d" % number, timeout=10) for number in range(5)]
    handler_failures = [request_outcome(address, b"raise") for _ in range(2)]
    oversized = send_oversized_header(producer.server_addr, 1000)
    empty = client.request(address, b"", timeout=10)

    status, content_type, body = http_get(producer.metrics_addr, "/metrics")
    text = body.decode("utf-8")
    stats = producer.stats()
    samples = parse_metrics(text)
    types = metric_types(text)

    assert status == 200
    assert content_type == CONTENT_TYPE
    # Nothing ran since the scrape, so the producer renders the same text.
    assert text == producer.metrics_text()

    assert replies == [b"ok %d" % number for number in range(5)]
    assert all(isinstance(outcome, gaspar.RequestFailed) for outcome in handler_failures)
    assert isinstance(oversized, ConnectionResetError)
    assert empty == b""

    # Nine connections: 5 replies, 2 handler failures, 1 oversized, 1 zero-length (neither success nor failure).
    assert stats["accepted"] == 9
    assert samples[("gaspar_requests_accepted_total", ())] == stats["accepted"]
    assert stats["succeeded"] == 5
    assert samples[("gaspar_requests_succeeded_total", ())] == stats["succeeded"]
    assert stats["failed"] == {"handler raised": 2, "request too large": 1}
    assert samples_named(samples, "gaspar_requests_failed_total") == {
        (("cause", "handler raised"),): 2,
        (("cause", "request too large"),): 1,
    }
    assert stats["accept_errors"] == 0
    assert samples[("gaspar_accept_errors_total", ())] == 0
    assert samples[("gaspar_requests_in_flight", ())] == 0
    assert samples[("gaspar_requests_queued", ())] == 0
    assert len(stats["workers"]) == 2
    assert samples[("gaspar_workers", ())] == 2
    assert samples[("gaspar_worker_restarts_total", ())] == 0

    served = samples_named(samples, "gaspar_worker_requests_served_total")
    assert {int(dict(labels)["pid"]) for labels in served} == set(stats["workers"])
    # A worker counts every request it replied to, whether the handler raised or not.
    assert sum(served.values()) == 5 + 2

    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for labels, value in samples_named(samples, "gaspar_request_duration_seconds_bucket").items()
    )
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)
    assert buckets[-1] == (math.inf, samples[("gaspar_request_duration_seconds_count", ())])
    assert samples[("gaspar_request_duration_seconds_count", ())] == stats["succeeded"]
    assert samples[("gaspar_request_duration_seconds_sum", ())] > 0

    assert types["gaspar_request_duration_seconds"] == "histogram"
    assert [name for name, kind in types.items() if name.endswith("_total") and kind != "counter"] == []
    assert types["gaspar_requests_in_flight"] == "gauge"


def test_metrics_endpoint_routes(start_producer):
    producer = start_producer(echo_or_raise, processes=1, metrics_port=0)
    metrics_addr = producer.metrics_addr

    health = http_get(metrics_addr, "/healthz")
    with_query = http_get(metrics_addr, "/metrics?name=gaspar_workers")
    missing = http_get(metrics_addr, "/no-such-page")
    post = http_get(metrics_addr, "/metrics", method="POST", body=b"x=1")
    producer.stop(timeout=30)

    assert metrics_addr[0] == "127.0.0.1"
    assert health == (200, CONTENT_TYPE, b"OK\n")
    assert with_query[0] == 200
    assert b"\ngaspar_workers 1\n" in with_query[2]
    assert missing[0] == 404
    assert post[0] == 405
    assert producer.metrics_addr is None
    with pytest.raises(ConnectionRefusedError):
        http_get(metrics_addr, "/healthz")


def test_metrics_head_has_no_body(start_producer):
    producer = start_producer(echo_or_raise, processes=1, metrics_port=0)

    response = raw_http(producer.metrics_addr, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.0 200 ")
    assert body == b""


def test_metrics_survives_malformed_requests(start_producer):
    producer = start_producer(echo_or_raise, processes=1, metrics_port=0)
    metrics_addr = producer.metrics_addr

    # Half a request head, then silence: the single-threaded loop must not wait for it.
    idle = socket.create_connection(metrics_addr, timeout=10)
    try:
        idle.sendall(b"GET /metr")
        head_too_large = raw_http(metrics_addr, b"X" * 9000)
        bad_request_line = raw_http(metrics_addr, b"\x00\xff\r\n\r\n")

        # A megabyte without a line break: the endpoint responds with 431 and closes
        # with input unread, so this client sees a reset somewhere along the way.
        flood = socket.create_connection(metrics_addr, timeout=10)
        try:
            flood.sendall(b"Y" * (1 << 20))
            flood.recv(65536)
        except OSError:
            pass
        finally:
            flood.close()

        health = http_get(metrics_addr, "/healthz")
        status, _, body = http_get(metrics_addr, "/metrics")
        reply = client.request(producer.address, b"still serving", timeout=10)
    finally:
        idle.close()

    assert head_too_large.startswith(b"HTTP/1.0 431 ")
    assert bad_request_line.startswith(b"HTTP/1.0 400 ")
    assert health[0] == 200
    assert status == 200
    assert parse_metrics(body.decode())[("gaspar_workers", ())] == 1
    assert reply == b"still serving"
    # The metrics port's clients are not requests.
    assert producer.stats()["accepted"] == 1
    assert producer.stats()["failed"] == {}


# -- Rolling restart and scaling of a `gaspar serve` daemon ----------------------------------


def test_serve_sighup_rolls_out_new_code(serve_daemon, tmp_path):
    module = tmp_path / "ops_versioned.py"
    module.write_text(VERSIONED_SOURCE.replace("VERSION_TAG", "v1"))
    daemon = serve_daemon(
        "ops_versioned:handle", "--port", "0", "--workers", "2", "--metrics-port", "0", env=handler_env(tmp_path)
    )
    old_pids = set(daemon.ready_pids().values())

    with Load(daemon.address, threads=3) as load:
        load.wait_for_more(50, seconds=1.0)
        rewrite_module(module, VERSIONED_SOURCE.replace("VERSION_TAG", "v2"))
        signalled_at = time.monotonic()
        daemon.signal_and_wait(signal.SIGHUP, r"SIGHUP received: replacing all 2 workers")
        new_ready = daemon.wait_for_matches(r"worker (?:3|4) \(pid (\d+)\) ready", 2, 15)
        wait_for(lambda: all(process_gone(pid) for pid in old_pids), 15, f"the old workers {sorted(old_pids)} to exit")
        old_gone_at = time.monotonic()
        load.wait_for_more(50, seconds=1.0)

    replies = [outcome for outcome in load.outcomes if isinstance(outcome.reply, bytes)]
    failures = load.failures()
    parsed = [(outcome, *outcome.reply.split(b":", 2)) for outcome in replies]
    status, _, body = http_get(daemon.metrics_addr(), "/metrics")
    samples = parse_metrics(body.decode())
    failed_samples = samples_named(samples, "gaspar_requests_failed_total")

    assert failures == []
    assert len(replies) > 100
    assert [outcome for outcome, _, _, message in parsed if message != outcome.message] == []
    assert {version for outcome, version, _, _ in parsed if outcome.ended < signalled_at} == {b"v1"}
    assert {version for outcome, version, _, _ in parsed if outcome.started > old_gone_at} == {b"v2"}
    new_pids = {int(match.group(1)) for match in new_ready}
    assert new_pids.isdisjoint(old_pids)
    assert {int(pid) for outcome, _, pid, _ in parsed if outcome.started > old_gone_at} <= new_pids

    # The daemon's own counts agree with the clients', and two workers were replaced.
    assert status == 200
    assert samples[("gaspar_requests_succeeded_total", ())] == len(replies)
    assert sum(failed_samples.values()) == len(failures)
    assert {dict(labels)["cause"] for labels in failed_samples} <= {"worker died"}
    assert samples[("gaspar_worker_restarts_total", ())] == 2
    assert samples[("gaspar_workers", ())] == 2
    assert daemon.process.poll() is None


def test_serve_sighup_paused_producer_keeps_reply(serve_daemon, tmp_path):
    """The last reply of a worker replaced by SIGHUP reaches its client even if the producer lags.

    SIGSTOP simulates a producer that is descheduled or busy while the old
    worker replies to its last request and exits. On SIGCONT the worker's
    exit (its sentinel) and its reply are both waiting, and the reply was
    sent first.
    """
    daemon = serve_daemon("ops_handlers:mark_then_sleep", "--port", "0", "--workers", "1", env=write_handlers(tmp_path))
    (old_pid,) = daemon.ready_pids().values()
    marker = tmp_path / "started-last"

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        last_request = pool.submit(request_outcome, daemon.address, os.fsencode(marker))
        wait_for(marker.exists, 10, "the old worker to start the request")
        daemon.signal_and_wait(signal.SIGHUP, r"SIGHUP received: replacing all 1 worker")
        daemon.wait_for_line(r"worker 2 \(pid \d+\) ready")
        # Time for the producer's STOP to reach the old worker, behind the request it holds.
        time.sleep(0.2)
        daemon.process.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: process_gone(old_pid), 10, "the old worker to reply and exit")
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        outcome = last_request.result(timeout=15)

    assert outcome == b"done"


def test_serve_sighup_then_ttin_runs_new_code(serve_daemon, tmp_path):
    module = tmp_path / "ops_versioned.py"
    module.write_text(VERSIONED_SOURCE.replace("VERSION_TAG", "v1"))
    daemon = serve_daemon("ops_versioned:handle", "--port", "0", "--workers", "1", env=handler_env(tmp_path))
    (old_pid,) = daemon.ready_pids().values()

    rewrite_module(module, VERSIONED_SOURCE.replace("VERSION_TAG", "v2"))
    daemon.signal_and_wait(signal.SIGHUP, r"SIGHUP received: replacing all 1 worker")
    daemon.wait_for_line(r"worker 2 \(pid \d+\) ready")
    wait_for(lambda: process_gone(old_pid), 10, "the old worker to exit")
    after_hup = client.request(daemon.address, b"after hup", timeout=10)

    daemon.signal_and_wait(signal.SIGTTIN, r"SIGTTIN received: adding a worker, now 2")
    added_pid = int(daemon.wait_for_line(r"worker 3 \(pid (\d+)\) ready").group(1))
    # Idle workers take requests in turn, so the added worker serves one of the first few.
    replies = [client.request(daemon.address, b"after ttin %d" % number, timeout=10) for number in range(6)]
    from_added = [reply for reply in replies if int(reply.split(b":", 2)[1]) == added_pid]

    assert after_hup.startswith(b"v2:")
    assert from_added != []
    assert [reply for reply in from_added if not reply.startswith(b"v2:")] == []


def test_serve_ttin_ttou_scale_workers(serve_daemon, tmp_path):
    daemon = serve_daemon("ops_handlers:pid_echo", "--port", "0", "--workers", "2", env=write_handlers(tmp_path))
    original_pids = set(daemon.ready_pids().values())

    with Load(daemon.address, threads=2) as load:
        load.wait_for_more(20, seconds=0.5)

        daemon.signal_and_wait(signal.SIGTTIN, r"SIGTTIN received: adding a worker, now 3")
        added_pid = int(daemon.wait_for_line(r"worker 3 \(pid (\d+)\) ready").group(1))
        wait_for(
            lambda: any(served_by(outcome.reply) == added_pid for outcome in load.outcomes[-200:] if isinstance(outcome.reply, bytes)),
            10,
            "a request served by the added worker",
        )
        daemon.record_tree()

        daemon.signal_and_wait(signal.SIGTTOU, r"SIGTTOU received: retiring a worker, now 2")
        daemon.signal_and_wait(signal.SIGTTOU, r"SIGTTOU received: retiring a worker, now 1")
        retired = [int(match.group(1)) for match in daemon.wait_for_matches(r"retiring worker \d+ \(pid (\d+)\)", 2, 10)]
        wait_for(lambda: all(process_gone(pid) for pid in retired), 10, f"the retired workers {retired} to exit")
        exits = daemon.wait_for_matches(r"worker \d+ \(pid (\d+)\) exited with code 0", 2, 10)
        last_retired_at = time.monotonic()
        load.wait_for_more(20, seconds=0.5)

        daemon.signal_and_wait(signal.SIGTTOU, r"WARNING \S+: SIGTTOU received: keeping the last worker")
        load.wait_for_more(20, seconds=0.5)

    after_retiring = [outcome for outcome in load.outcomes if outcome.started > last_retired_at]

    assert load.failures() == []
    assert set(retired) == original_pids
    assert {int(match.group(1)) for match in exits} == original_pids
    assert {served_by(outcome.reply) for outcome in after_retiring} == {added_pid}
    assert not process_gone(added_pid)
    assert daemon.process.poll() is None


def test_serve_ttin_raises_in_flight_limit(serve_daemon, tmp_path):
    daemon = serve_daemon("ops_handlers:mark_then_sleep", "--port", "0", "--workers", "1", env=write_handlers(tmp_path))
    for count in range(2, 6):
        daemon.signal_and_wait(signal.SIGTTIN, rf"SIGTTIN received: adding a worker, now {count}")
    daemon.wait_for_matches(READY.pattern, 5, 15)
    markers = [tmp_path / f"started-{number}" for number in range(5)]

    threads = [
        threading.Thread(target=request_outcome, args=(daemon.address, os.fsencode(marker))) for marker in markers
    ]
    for thread in threads:
        thread.start()
    # Each handler creates its marker and then sleeps 1.5 s, so with 5 workers all 5 markers appear at once.
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline and not all(marker.exists() for marker in markers):
        time.sleep(0.02)
    started = sum(marker.exists() for marker in markers)
    for thread in threads:
        thread.join(15)

    assert started == 5


# -- Logging ---------------------------------------------------------------------------------


def test_serve_json_log_lines(serve_daemon, tmp_path):
    daemon = serve_daemon(
        "ops_handlers:echo_or_raise",
        "--port", "0",
        "--workers", "1",
        "--max-request-size", "64",
        "--log-format", "json",
        env=write_handlers(tmp_path),
    )
    (worker_pid,) = daemon.ready_pids().values()
    host, port = client.parse_address(daemon.address)

    reply = client.request(daemon.address, b"hello", timeout=10)
    handler_failure = request_outcome(daemon.address, b"raise")
    oversized = send_oversized_header((host, port), 1000)
    daemon.wait_for_line(r"handler failed on request")
    daemon.wait_for_line(r"rejected a request: request too large")
    returncode = daemon.stop()

    not_json = []
    records = []
    for line in daemon.lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            not_json.append(line)
    def find(pattern: str) -> list:
        return [record for record in records if re.search(pattern, record["message"])]

    assert reply == b"hello"
    assert isinstance(handler_failure, gaspar.RequestFailed)
    assert isinstance(oversized, ConnectionResetError)
    assert returncode == 0
    assert not_json == []
    assert [record for record in records if not JSON_LOG_KEYS <= set(record) <= JSON_LOG_KEYS | {"exception"}] == []
    assert [record for record in records if datetime.datetime.fromisoformat(record["time"]).utcoffset() is None] == []
    assert [record for record in records if not isinstance(record["pid"], int)] == []

    listening = find(r"^listening on ")
    assert len(listening) == 1
    assert listening[0]["pid"] == daemon.process.pid
    assert listening[0]["level"] == "INFO"
    assert "exception" not in listening[0]
    assert len(find(rf"^worker 1 \(pid {worker_pid}\) ready$")) == 1
    assert len(find(rf"^worker 1 \(pid {worker_pid}\) exited with code 0$")) == 1
    rejected = find(r"^rejected a request: request too large")
    assert len(rejected) == 1
    assert rejected[0]["level"] == "WARNING"
    failed = find(r"handler failed on request")
    assert len(failed) == 1
    assert failed[0]["pid"] == worker_pid
    assert failed[0]["level"] == "ERROR"
    assert "ValueError: injected handler failure" in failed[0]["exception"]


def test_serve_text_log_has_pid(serve_daemon, tmp_path):
    daemon = serve_daemon("ops_handlers:echo_or_raise", "--port", "0", "--workers", "1", env=write_handlers(tmp_path))
    (worker_pid,) = daemon.ready_pids().values()

    handler_failure = request_outcome(daemon.address, b"raise")
    daemon.wait_for_line(r"handler failed on request")
    listening = TEXT_LOG_LINE.match(daemon.wait_for_line(LISTENING.pattern).string)
    failed = TEXT_LOG_LINE.match(daemon.wait_for_line(r"handler failed on request").string)

    assert isinstance(handler_failure, gaspar.RequestFailed)
    assert listening is not None
    assert int(listening.group(1)) == daemon.process.pid
    assert failed is not None
    assert int(failed.group(1)) == worker_pid
    assert failed.group(2) == "ERROR"


# -- Command line ----------------------------------------------------------------------------


def run_gaspar(*arguments, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m gaspar ARGUMENTS`` to completion and capture its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "gaspar", *arguments],
        capture_output=True,
        text=True,
        env=env if env is not None else handler_env(),
        timeout=30,
    )


def test_serve_check_accepts_target():
    # --check neither binds nor forks, so a taken port does not matter.
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run_gaspar("serve", "gaspar.examples:echo", "--check", "--port", str(port))

    assert result.returncode == 0
    assert result.stdout.startswith("gaspar.examples:echo: OK, ")
    assert "echo" in result.stdout.partition(", ")[2]
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize(
    "target, message",
    [
        ("gaspar.examples:no_such_handler", "has no attribute 'no_such_handler'"),
        ("no_such_module_for_gaspar:handle", "cannot import module 'no_such_module_for_gaspar'"),
        ("gaspar.examples:SCRYPT_SALT", "is of type bytes"),
        ("gaspar.examples", "expected MODULE:ATTR"),
    ],
)
def test_serve_check_rejects_target(target, message):
    result = run_gaspar("serve", target, "--check")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("gaspar serve: ")
    assert message in result.stderr


def test_serve_check_syntax_error(tmp_path):
    (tmp_path / "ops_broken.py").write_text("def handle(message):\n    return message +\n")

    result = run_gaspar("serve", "ops_broken:handle", "--check", env=handler_env(tmp_path))

    assert result.returncode == 2
    assert result.stderr.startswith("gaspar serve: ")
    assert "Traceback" not in result.stderr


def test_cli_version_matches_package():
    result = run_gaspar("--version")

    assert result.returncode == 0
    assert result.stdout == f"gaspar {gaspar.__version__}\n"


def test_serve_metrics_flag_serves_metrics(serve_daemon, tmp_path):
    daemon = serve_daemon(
        "gaspar.examples:echo",
        "--port", "0",
        "--workers", "1",
        "--metrics-port", "0",
        "--metrics-host", "127.0.0.1",
        env=handler_env(tmp_path),
    )
    metrics_addr = daemon.metrics_addr()

    before = http_get(metrics_addr, "/metrics")
    reply = client.request(daemon.address, b"counted", timeout=10)
    after = http_get(metrics_addr, "/metrics")
    health = http_get(metrics_addr, "/healthz")
    samples_before = parse_metrics(before[2].decode())
    samples_after = parse_metrics(after[2].decode())

    assert metrics_addr[0] == "127.0.0.1"
    assert before[0] == 200
    assert before[1] == CONTENT_TYPE
    assert samples_before[("gaspar_workers", ())] == 1
    assert samples_before[("gaspar_requests_accepted_total", ())] == 0
    assert reply == b"counted"
    assert samples_after[("gaspar_requests_accepted_total", ())] == 1
    assert samples_after[("gaspar_requests_succeeded_total", ())] == 1
    assert samples_after[("gaspar_request_duration_seconds_count", ())] == 1
    assert health[0] == 200


def test_stats_latency_histogram(start_producer):
    producer = start_producer(gaspar.examples.echo)
    for number in range(5):
        assert client.request(producer.address, b"%d" % number, timeout=10) == b"%d" % number

    latency = producer.stats()["latency"]

    assert latency["count"] == 5
    assert latency["buckets"][-1] == ("+Inf", 5)
    counts = [count for _, count in latency["buckets"]]
    assert counts == sorted(counts)
    assert latency["sum"] > 0


SLOW_IMPORT_SOURCE = VERSIONED_SOURCE + '''
# Importing takes a while, so a second signal can arrive while replacements start.
time.sleep(0.5)
'''


def test_serve_second_sighup_during_restart(serve_daemon, tmp_path):
    module = tmp_path / "ops_slow_import.py"
    module.write_text(SLOW_IMPORT_SOURCE.replace("VERSION_TAG", "v1"))
    daemon = serve_daemon("ops_slow_import:handle", "--port", "0", "--workers", "2", env=handler_env(tmp_path))

    with Load(daemon.address, threads=2) as load:
        rewrite_module(module, SLOW_IMPORT_SOURCE.replace("VERSION_TAG", "v2"))
        daemon.signal_and_wait(signal.SIGHUP, r"SIGHUP received: replacing all 2 workers")
        # The v2 replacements are still importing when v3 is deployed.
        rewrite_module(module, SLOW_IMPORT_SOURCE.replace("VERSION_TAG", "v3"))
        os.kill(daemon.process.pid, signal.SIGHUP)
        wait_for(
            lambda: all(
                outcome.reply.startswith(b"v3:")
                for outcome in load.outcomes[-20:]
                if isinstance(outcome.reply, bytes)
            )
            and len(load.outcomes) > 20,
            20,
            "every reply to come from v3",
        )

    assert load.failures() == []


def test_serve_ttou_during_restart(serve_daemon, tmp_path):
    module = tmp_path / "ops_slow_import.py"
    module.write_text(SLOW_IMPORT_SOURCE.replace("VERSION_TAG", "v1"))
    daemon = serve_daemon(
        "ops_slow_import:handle", "--port", "0", "--workers", "3", "--metrics-port", "0", env=handler_env(tmp_path)
    )

    daemon.signal_and_wait(signal.SIGHUP, r"SIGHUP received: replacing all 3 workers")
    daemon.signal_and_wait(signal.SIGTTOU, r"SIGTTOU received: retiring a worker, now 2")

    def live_workers():
        samples = parse_metrics(http_get(daemon.metrics_addr(), "/metrics")[2].decode())
        return samples_named(samples, "gaspar_workers")

    wait_for(lambda: list(live_workers().values()) == [2.0], 20, "two workers after the restart")
    assert client.request(daemon.address, b"still serving", timeout=10).startswith(b"v1:")


def test_serve_scaling_ignored_while_stopping(serve_daemon, tmp_path):
    daemon = serve_daemon(
        "ops_handlers:mark_then_sleep", "--port", "0", "--workers", "1", env=write_handlers(tmp_path)
    )

    marker = tmp_path / "started"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(request_outcome, daemon.address, str(marker).encode())
        wait_for(marker.exists, 10, "the handler to start")
        daemon.signal_and_wait(signal.SIGTERM, r"SIGTERM received: stopping gracefully")
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            daemon.signal_and_wait(signum, rf"{signal.Signals(signum).name} received while stopping: ignored")
        outcome = pending.result()

    assert outcome == b"done"
    assert daemon.stop() == 0
    assert daemon.matches(r"worker 2 \(pid") == []


def test_metrics_large_complete_head_rejected(start_producer):
    producer = start_producer(gaspar.examples.echo, metrics_port=0)
    head = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 12000 + b"\r\n\r\n"

    response = raw_http(producer.metrics_addr, head)

    assert response.startswith(b"HTTP/1.0 431 ")
