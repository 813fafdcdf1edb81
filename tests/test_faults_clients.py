"""Fault-injection tests of the producer against misbehaving clients.

Every test runs a real daemon (real sockets, forked workers, 0MQ) and sends
it oversized, slow, silent, departing or flooding clients. Each checks what
happens to the faulty client and that healthy requests sent at the same time
still get their replies.
"""

import concurrent.futures
import contextlib
import logging
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gaspar
from gaspar import client
from gaspar.examples import echo

from conftest import subprocess_env, wait_for

# SO_LINGER on with a zero timeout: close() sends a reset (RST) instead of a FIN.
LINGER_RESET = struct.pack("ii", 1, 0)
# A header that declares the largest length 4 bytes can express, 4 GiB - 1.
MAX_LENGTH_HEADER = struct.pack("!I", 0xFFFFFFFF)
MIB = 1024 * 1024


def echo_after(seconds: float):
    """Return a handler that sleeps ``seconds`` and then echoes the request."""

    def handler(message: bytes) -> bytes:
        time.sleep(seconds)
        return message

    return handler


def small_buffer_request(address: str, message: bytes, timeout: float) -> bytes:
    """Send one request and read the reply with 4 KiB reads.

    client.request() reads 256 KiB at a time, which would swamp the
    tracemalloc peak of the tests that measure the producer's allocations.
    """
    host, port = client.parse_address(address)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(client.pack(message))
        chunks = []
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class HealthyLoad:
    """Threads that send echo requests until stopped and record every outcome.

    Use it as a context manager around the fault. ``failures`` lists each
    request that failed or came back wrong, ``succeeded`` counts the rest.
    """

    def __init__(self, address: str, threads: int = 2, interval: float = 0.01, request=client.request):
        self.address = address
        self.interval = interval
        self.request = request
        self.failures = []
        self.succeeded = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(threads)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        number = 0
        while not self._stop.is_set():
            message = b"healthy %d/%d " % (index, number) + bytes(range(64))
            try:
                reply = self.request(self.address, message, timeout=10)
            except Exception as exc:  # every failure is a finding, so the test reports them all
                with self._lock:
                    self.failures.append(f"request {index}/{number} failed: {exc!r}")
            else:
                with self._lock:
                    if reply == message:
                        self.succeeded += 1
                    else:
                        self.failures.append(f"request {index}/{number} got a wrong reply of {len(reply)} bytes")
            number += 1
            # Pace the load so it does not starve the fault on 2 cores.
            self._stop.wait(self.interval)


class Sampler:
    """A thread that records the maximum of measure() every 2 ms until stopped."""

    def __init__(self, measure):
        self.measure = measure
        self.maximum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.maximum = max(self.maximum, self.measure())
            self.samples += 1
            self._stop.wait(0.002)


def wait_reset(sock: socket.socket, timeout: float) -> float:
    """Wait until the server resets sock; return the seconds waited.

    Fails the test when the server closes cleanly, sends data or stays
    silent for ``timeout`` seconds.
    """
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return time.monotonic() - started
    except socket.timeout:
        pass
    else:
        pytest.fail(f"the server ended the connection without a reset after sending {data!r}")
    pytest.fail(f"the server did not reset the connection within {timeout} s")


def open_idle(address, count: int, sockets: list) -> None:
    """Open count connections that send nothing; append them to sockets for the caller to close."""
    for _ in range(count):
        sockets.append(socket.create_connection(address, timeout=10))


def close_all(sockets: list) -> None:
    for sock in sockets:
        sock.close()
    sockets.clear()


@contextlib.contextmanager
def file_limit_at_least(needed: int):
    """Raise this process's RLIMIT_NOFILE soft limit to at least needed; skip if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- Oversized requests --------------------------------------------------------


def test_oversized_request_fails(start_producer):
    producer = start_producer(echo, max_request_size=1024)

    with HealthyLoad(producer.address) as load:
        with pytest.raises(gaspar.RequestFailed):
            client.request(producer.address, b"x" * 1025, timeout=10)
        assert client.request(producer.address, b"x" * 1024, timeout=10) == b"x" * 1024

    assert producer.stats()["failed"].get("request too large") == 1
    assert load.failures == []
    assert load.succeeded > 0


@pytest.mark.parametrize(
    "max_request_size, header, split",
    [
        (1024, MAX_LENGTH_HEADER, False),
        (1024, MAX_LENGTH_HEADER, True),
        (None, MAX_LENGTH_HEADER, False),
        (None, MAX_LENGTH_HEADER, True),
        (None, struct.pack("!I", 64 * MIB + 1), False),
    ],
    ids=["1KiB-limit", "1KiB-limit-split", "default-limit", "default-limit-split", "default-limit-plus-one"],
)
def test_oversized_header_resets_at_once(start_producer, max_request_size, header, split):
    options = {} if max_request_size is None else {"max_request_size": max_request_size}
    producer = start_producer(echo, **options)

    tracemalloc.start()
    try:
        with HealthyLoad(producer.address, request=small_buffer_request) as load:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            with socket.create_connection(producer.server_addr, timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if split:
                    # Two sends 50 ms apart let the producer read a partial
                    # header first, so the header goes through its FrameParser.
                    sock.sendall(header[:2])
                    time.sleep(0.05)
                    sock.sendall(header[2:])
                else:
                    sock.sendall(header)
                seconds = wait_reset(sock, timeout=5)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert seconds < 1
    assert peak - baseline < MIB
    assert producer.stats()["failed"].get("request too large") == 1
    assert load.failures == []
    assert load.succeeded > 0


def test_oversized_logs_once(start_producer, caplog):
    caplog.set_level(logging.WARNING, logger="gaspar.producers")
    producer = start_producer(echo, max_request_size=1024)

    with HealthyLoad(producer.address) as load:
        for _ in range(20):
            with pytest.raises(gaspar.RequestFailed):
                client.request(producer.address, b"x" * 2048, timeout=10)

    too_large = [record for record in caplog.records if "request too large" in record.getMessage()]
    assert producer.stats()["failed"].get("request too large") == 20
    assert 1 <= len(too_large) <= 2
    assert load.failures == []
    assert load.succeeded > 0


# -- Slow or silent clients ------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"\x00\x00"], ids=["silent", "half-header"])
def test_read_timeout_resets_stalled(start_producer, sent):
    producer = start_producer(echo, read_timeout=0.5)

    with HealthyLoad(producer.address) as load:
        started = time.monotonic()
        with socket.create_connection(producer.server_addr, timeout=10) as sock:
            sock.sendall(sent)
            wait_reset(sock, timeout=5)
        seconds = time.monotonic() - started

    assert 0.3 <= seconds <= 3
    assert producer.stats()["failed"].get("read timeout") == 1
    assert load.failures == []
    assert load.succeeded > 0


def test_read_timeout_resets_trickle(start_producer):
    producer = start_producer(echo, read_timeout=0.5)
    # 104 bytes at one byte per 0.2 s would take 20.8 s, far past the timeout.
    frame = client.pack(bytes(100))
    reset_after = None

    with HealthyLoad(producer.address) as load:
        started = time.monotonic()
        with socket.create_connection(producer.server_addr, timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for index in range(len(frame)):
                readable, _, _ = select.select([sock], [], [], 0)
                try:
                    if readable and not sock.recv(4096):
                        pytest.fail("the server closed the trickling connection without a reset")
                    sock.send(frame[index : index + 1])
                except (ConnectionResetError, BrokenPipeError):
                    reset_after = time.monotonic() - started
                    break
                if time.monotonic() - started > 5:
                    break
                time.sleep(0.2)  # the deliberately slow client's pace

    assert reset_after is not None, "the trickling client was never reset"
    assert 0.3 <= reset_after <= 3
    assert producer.stats()["failed"].get("read timeout") == 1
    assert load.failures == []
    assert load.succeeded > 0


def test_idle_connections_no_delay(start_producer):
    idle_count = 1000
    # Both ends of every idle connection live in this process, plus margin.
    with file_limit_at_least(2 * idle_count + 256):
        producer = start_producer(echo, read_timeout=30, max_connections=2000)
        idle = []
        try:
            open_idle(producer.server_addr, idle_count, idle)
            wait_for(
                lambda: len(producer._connections) >= idle_count, 10, f"the producer to accept {idle_count} connections"
            )

            def timed_request(number):
                message = b"healthy %d" % number
                started = time.monotonic()
                reply = client.request(producer.address, message, timeout=10)
                return reply == message, time.monotonic() - started

            with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
                results = list(pool.map(timed_request, range(50)))
            open_connections = len(producer._connections)
        finally:
            close_all(idle)

    assert all(correct for correct, _ in results)
    assert max(seconds for _, seconds in results) < 1
    assert open_connections >= idle_count


def test_slow_reader_frees_slot(start_producer):
    # The 24 MiB reply fills the loopback socket buffers, so the producer
    # stays in WRITING for as long as the client does not read.
    producer = start_producer(echo, processes=1, max_in_flight=2, read_timeout=1, timeout=1, write_timeout=1)
    payload = bytes(24 * MIB)
    readers = []

    try:
        for _ in range(2):
            sock = socket.create_connection(producer.server_addr, timeout=10)
            readers.append(sock)
            sock.sendall(client.pack(payload))
        wait_for(lambda: producer._counted >= 2, 10, "both non-reading requests to be read")

        # This waits in the listen backlog until the write timeout resets
        # the clients that do not read.
        reply = client.request(producer.address, b"healthy", timeout=3)
    finally:
        close_all(readers)

    assert reply == b"healthy"


# -- Clients that leave early ----------------------------------------------------


@contextlib.contextmanager
def default_sigpipe():
    """Restore SIGPIPE's default action (kill the process) for the duration of the block.

    Python ignores SIGPIPE at start-up, which would hide a send() without
    MSG_NOSIGNAL. Processes forked inside the block inherit the default too.
    """
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGPIPE, previous)


@pytest.mark.parametrize("reply_size", [100, 8 * MIB], ids=["small-reply", "large-reply"])
def test_client_left_counted(start_producer, caplog, reply_size):
    caplog.set_level(logging.INFO, logger="gaspar.producers")
    leavers = 5

    with default_sigpipe():
        producer = start_producer(echo_after(0.3))
        with HealthyLoad(producer.address, interval=0.05) as load:
            for number in range(leavers):
                for reset in (False, True):
                    sock = socket.create_connection(producer.server_addr, timeout=10)
                    try:
                        sock.sendall(client.pack(b"%d" % number * reply_size))
                        if reset:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    finally:
                        sock.close()
        wait_for(lambda: not producer._connections, 10, "every reply to come back")
        stats = producer.stats()

    client_left = stats["failed"].get("client left", 0)
    errors = [
        record for record in caplog.records if record.name == "gaspar.producers" and record.levelno >= logging.ERROR
    ]
    assert producer.running.is_set()
    assert errors == []
    if reply_size < MIB:
        # A reset is always seen, when reading or when sending the reply. A
        # client that closes with a FIN looks like one that half-closed and
        # still reads, so its small reply fits the socket buffer and the
        # producer counts it as succeeded.
        assert client_left >= leavers
    else:
        # A large reply outgrows the socket buffer, so the producer is still
        # sending when the closed client's kernel replies with a reset.
        assert client_left == 2 * leavers
    # Every request is counted once, as succeeded or under "client left".
    assert client_left + stats["succeeded"] == stats["accepted"]
    assert set(stats["failed"]) == {"client left"}
    assert load.failures == []
    assert load.succeeded > 0


# -- Connection floods -----------------------------------------------------------


def test_flood_connections_capped(start_producer):
    producer = start_producer(echo, max_connections=20, read_timeout=1)
    idle = []

    try:
        with Sampler(lambda: len(producer._connections)) as sampler:
            open_idle(producer.server_addr, 40, idle)
            started = time.monotonic()
            messages = [b"healthy %d" % number for number in range(5)]
            with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
                replies = list(
                    pool.map(lambda message: client.request(producer.address, message, timeout=10), messages)
                )
            seconds = time.monotonic() - started
    finally:
        close_all(idle)

    assert replies == messages
    assert seconds < 4
    assert sampler.samples > 50
    assert sampler.maximum <= 20
    # The last idle connections may still wait out their read timeout after
    # the healthy requests get their replies.
    wait_for(
        lambda: producer.stats()["failed"].get("read timeout") == 40, 10, "every idle connection to time out"
    )


EMFILE_DAEMON = textwrap.dedent(
    """
    import logging
    import resource
    import sys

    import gaspar
    from gaspar.examples import echo

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    gaspar.Producer(echo, 0, processes=1, read_timeout=3).start()
    """
)


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of every thread of pid, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat_file:
        stat = stat_file.read()
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StderrLines:
    """A thread that collects a process's stderr lines, so the pipe never fills."""

    def __init__(self, stream):
        self.lines = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self.lines.append(line.decode(errors="replace"))

    def find(self, text: str):
        return next((line for line in list(self.lines) if text in line), None)


def test_flood_emfile_no_busy_loop(tmp_path):
    script = tmp_path / "daemon.py"
    script.write_text(EMFILE_DAEMON)
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, env=subprocess_env())
    idle = []
    try:
        stderr = StderrLines(process.stderr)
        line = wait_for(lambda: stderr.find("listening on "), 30, "the daemon to listen")
        address = line.split("listening on ", 1)[1].split()[0]
        host, port = client.parse_address(address)

        open_idle((host, port), 100, idle)
        wait_for(lambda: stderr.find("accept failed"), 10, "the daemon to run out of descriptors")
        cpu_before = cpu_seconds(process.pid)
        wall_before = time.monotonic()
        time.sleep(1.0)  # the measurement window
        cpu_share = (cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - wall_before)

        close_all(idle)
        started = time.monotonic()
        messages = [b"healthy %d" % number for number in range(5)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
            replies = list(pool.map(lambda message: client.request(address, message, timeout=10), messages))
        seconds = time.monotonic() - started

        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=30)
    finally:
        close_all(idle)
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()

    assert cpu_share < 0.3
    assert replies == messages
    assert seconds < 5
    assert exit_code == 0


# -- Request floods --------------------------------------------------------------


def test_flood_in_flight_capped(start_producer):
    producer = start_producer(echo_after(0.1), processes=2, max_in_flight=4)
    messages = [bytes([number]) * MIB for number in range(40)]

    def dispatcher_load():
        stats = producer.stats()
        return stats["in_flight"] + stats["queued"]

    with Sampler(dispatcher_load) as sampler:
        with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
            replies = list(pool.map(lambda message: client.request(producer.address, message, timeout=30), messages))

    assert all(reply == message for reply, message in zip(replies, messages))
    assert sampler.samples > 50
    assert sampler.maximum <= 4
    assert producer.stats()["succeeded"] == 40


def test_held_request_not_timed_out(start_producer):
    producer = start_producer(echo_after(1.5), processes=1, max_in_flight=1, read_timeout=1)

    with socket.create_connection(producer.server_addr, timeout=10) as held:
        wait_for(lambda: len(producer._connections) == 1, 10, "the producer to accept the connection")
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(client.request, producer.address, b"first", 10)
            wait_for(lambda: producer.stats()["in_flight"] == 1, 10, "the first request to reach the worker")
            # The whole request is sent at once, well within the read timeout,
            # but the producer leaves it unread until the first reply is sent.
            held.sendall(client.pack(b"held"))
            held.settimeout(10)
            try:
                reply = held.recv(4096)
            except ConnectionResetError:
                reply = None
            assert first.result() == b"first"

    assert producer.stats()["failed"].get("read timeout", 0) == 0
    assert reply == b"held"


# -- Arbitrary byte streams ------------------------------------------------------

FUZZ_MAX_REQUEST_SIZE = 4096
DISCONNECT_MODES = ("close", "half-close", "reset", "wait-reply")

chunk_lists = st.lists(
    st.tuples(st.binary(min_size=1, max_size=48), st.sampled_from([0.0, 0.0, 0.01, 0.05])),
    max_size=5,
)
valid_headers = st.integers(min_value=0, max_value=64).map(lambda size: struct.pack("!I", size))
streams = st.tuples(st.one_of(st.just(b""), valid_headers), chunk_lists, st.sampled_from(DISCONNECT_MODES))


def expected_outcome(data: bytes):
    """Return the reply the producer owes a client that sent data and waits: bytes, or None for a reset.

    A client that half-closes after an incomplete request also gets a
    reset, but one that half-closes after sending nothing gets b"".
    """
    if len(data) < 4:
        return None
    (size,) = struct.unpack("!I", data[:4])
    if size > FUZZ_MAX_REQUEST_SIZE or len(data) < 4 + size:
        return None
    return data[4 : 4 + size]


def send_stream(address, header: bytes, chunks, mode: str):
    """Send header and chunks with their pauses, then end the connection in the given mode.

    Returns (bytes sent, reply or None when not read, whether the producer reset).
    """
    sent = header
    reset = False
    with socket.create_connection(address, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if header:
                sock.sendall(header)
            for chunk, pause in chunks:
                sock.sendall(chunk)
                sent += chunk
                if pause:
                    time.sleep(pause)  # a deliberately slow client
        except (ConnectionResetError, BrokenPipeError):
            return sent, None, True

        if mode == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            return sent, None, False
        if mode == "close":
            return sent, None, False
        if mode == "half-close":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                # ENOTCONN: the producer already reset the connection.
                return sent, None, True

        # A 0.5 s read timeout ends every stalled request well within 5 s.
        sock.settimeout(5)
        chunks_read = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks_read.append(data)
        except ConnectionResetError:
            reset = True
        return sent, b"".join(chunks_read), reset


def check_outcome(sent: bytes, reply, reset: bool, mode: str) -> None:
    if reply is None:
        return
    expected = expected_outcome(sent)
    if expected is None:
        if mode == "half-close" and not sent:
            assert not reset
            assert reply == b""
        else:
            assert reset, f"no reset after {sent!r}, got {reply!r}"
            assert reply == b""
    elif len(sent) == 4 + len(expected):
        assert not reset
        assert reply == expected
    else:
        # Bytes after the frame may reach the socket after the producer
        # closed it. Linux then sends a reset, which can cut the reply short.
        assert expected.startswith(reply)


def test_fuzz_byte_streams(start_producer):
    producer = start_producer(echo, read_timeout=0.5, max_request_size=FUZZ_MAX_REQUEST_SIZE)

    # One producer serves every example. @given wraps an inner function, so
    # the function-scoped fixture is not passed through Hypothesis.
    @settings(max_examples=60, deadline=None)
    @given(stream=streams)
    def run_example(stream):
        header, chunks, mode = stream
        sent, reply, reset = send_stream(producer.server_addr, header, chunks, mode)
        check_outcome(sent, reply, reset, mode)
        assert client.request(producer.address, b"healthy", timeout=10) == b"healthy"
        assert producer.running.is_set()

    run_example()

    wait_for(lambda: not producer._connections, 2, "the producer to close every fuzzed connection")
    assert producer.running.is_set()
