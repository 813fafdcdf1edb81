"""Tests of gaspar.client under cooperative concurrency: request_async, and request under gevent.

Most tests run against a real daemon started with the start_producer
fixture from conftest.py. A few use a raw server in a thread, to reach
failures that a healthy daemon never produces: a reset after part of the
reply, or a server that stops reading. Each asyncio test runs its own event
loop with asyncio.run. The gevent test runs in a subprocess, because
monkey-patching would change this process for every later test.
"""

import asyncio
import gc
import importlib.util
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest

import gaspar
from gaspar.client import request_async

from conftest import subprocess_env

# SO_LINGER on with a zero timeout: close() sends a reset instead of a FIN.
LINGER_RESET = struct.pack("ii", 1, 0)


def echo(message: bytes) -> bytes:
    return message


def fail(message: bytes) -> bytes:
    raise RuntimeError("the handler failed on purpose")


def sleep_then_echo(message: bytes) -> bytes:
    time.sleep(1.0)
    return message


def sleep_briefly_then_echo(message: bytes) -> bytes:
    time.sleep(0.1)
    return message


# Run with the daemon's address as its argument. Prints the replies and the
# largest number of requests that were in flight at once, as JSON.
GEVENT_CLIENT_SCRIPT = """
import json
import sys

from gevent import monkey

monkey.patch_all()

import gevent

from gaspar.client import request

address = sys.argv[1]
in_flight = 0
max_in_flight = 0


def send(number):
    global in_flight, max_in_flight
    in_flight += 1
    max_in_flight = max(max_in_flight, in_flight)
    try:
        return request(address, b"greenlet %d" % number, timeout=20).decode("ascii")
    finally:
        in_flight -= 1


greenlets = [gevent.spawn(send, number) for number in range(20)]
gevent.joinall(greenlets, timeout=30, raise_error=True)
print(json.dumps({"replies": [greenlet.value for greenlet in greenlets], "max_in_flight": max_in_flight}))
"""


def closed_port_address() -> str:
    """Return "127.0.0.1:PORT" for a port that was just free and has no listener."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"127.0.0.1:{port}"


class RawServer:
    """A server on 127.0.0.1:0 that accepts one connection and runs behaviour(conn) in a thread."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        # Bounds accept() so the thread ends even when no client connects.
        self.listener.settimeout(10)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            self.behaviour(conn)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.thread.join(15)
        self.listener.close()
        assert not self.thread.is_alive(), "raw server thread did not end within 15 s"


def read_request(conn: socket.socket) -> bytes:
    """Read one length-prefixed request from conn and return its payload."""
    conn.settimeout(10)
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("client closed the connection before sending a whole request")
        data += chunk
    return data[4:]


# -- against a real daemon -------------------------------------------------


def test_request_async_every_byte_value(start_producer):
    producer = start_producer(echo)
    message = bytes(range(256)) * 3

    reply = asyncio.run(request_async(producer.address, message, timeout=10))

    assert reply == message


def test_request_async_one_mebibyte(start_producer):
    producer = start_producer(echo)
    message = random.Random(1).randbytes(1024 * 1024)

    reply = asyncio.run(request_async(producer.address, message, timeout=20))

    assert len(reply) == len(message)
    assert reply == message


def test_request_async_empty_message(start_producer):
    # The daemon closes a zero-length request with no reply, as a success.
    producer = start_producer(echo)

    reply = asyncio.run(request_async(producer.address, b"", timeout=10))

    assert reply == b""


def test_request_async_handler_raises(start_producer):
    producer = start_producer(fail)

    with pytest.raises(gaspar.RequestFailed) as caught:
        asyncio.run(request_async(producer.address, b"x", timeout=10))

    assert caught.value.address == producer.address
    assert isinstance(caught.value.__cause__, ConnectionResetError)


def test_request_async_timeout(start_producer):
    producer = start_producer(sleep_then_echo)

    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        asyncio.run(request_async(producer.address, b"x", timeout=0.3))
    elapsed = time.monotonic() - started

    assert elapsed >= 0.3
    assert elapsed < 2
    assert producer.address in str(caught.value)
    assert not isinstance(caught.value, gaspar.RequestFailed)


def test_request_async_connection_refused():
    address = closed_port_address()

    with pytest.raises(ConnectionRefusedError) as caught:
        asyncio.run(request_async(address, b"x", timeout=5))

    assert not isinstance(caught.value, gaspar.RequestFailed)


def test_request_async_concurrent_gather(start_producer):
    producer = start_producer(echo)
    messages = [b"request %d" % number for number in range(50)]

    async def send_all():
        return await asyncio.gather(*(request_async(producer.address, message, timeout=20) for message in messages))

    replies = asyncio.run(send_all())

    assert replies == messages


def test_request_async_ipv6(start_producer):
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError as error:
        pytest.skip(f"cannot bind the IPv6 loopback address ::1: {error}")

    producer = start_producer(echo, host="::1")
    reply = asyncio.run(request_async(producer.address, b"over IPv6", timeout=10))

    assert producer.address.startswith("[::1]:")
    assert reply == b"over IPv6"


def test_request_async_closes_sockets(start_producer):
    # Success, failure, timeout and refusal each close their socket. A
    # transport or socket collected while still open emits ResourceWarning.
    echo_producer = start_producer(echo)
    failing_producer = start_producer(fail)
    sleeping_producer = start_producer(sleep_then_echo)

    async def run_every_outcome():
        await request_async(echo_producer.address, b"x", timeout=10)
        with pytest.raises(gaspar.RequestFailed):
            await request_async(failing_producer.address, b"x", timeout=10)
        with pytest.raises(TimeoutError):
            await request_async(sleeping_producer.address, b"x", timeout=0.2)
        with pytest.raises(ConnectionRefusedError):
            await request_async(closed_port_address(), b"x", timeout=5)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(run_every_outcome())
        gc.collect()

    unclosed = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert unclosed == []


# -- argument errors, before any connection --------------------------------


def test_request_async_str_message_type_error():
    # A closed port: if the client connected before checking the type, the
    # test would see ConnectionRefusedError instead.
    address = closed_port_address()

    with pytest.raises(TypeError, match="bytes-like"):
        asyncio.run(request_async(address, "hunter2", timeout=5))


def test_request_async_invalid_address():
    with pytest.raises(ValueError, match="'localhost'"):
        asyncio.run(request_async("localhost", b"x", timeout=5))


# -- against raw servers ---------------------------------------------------


def test_request_async_partial_reply_reset():
    # Bytes that arrive before the reset are not a reply: the request failed.
    def reply_part_then_reset(conn):
        read_request(conn)
        conn.sendall(b"partial reply")
        # Lets the partial reply reach the client's buffer before the reset.
        time.sleep(0.1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

    with RawServer(reply_part_then_reset) as server:
        with pytest.raises(gaspar.RequestFailed) as caught:
            asyncio.run(request_async(server.address, b"x", timeout=10))

    assert isinstance(caught.value.__cause__, ConnectionResetError)


def test_request_async_reset_while_sending():
    # The server resets right after accept(), while the client is still
    # writing 16 MiB, so the client sees EPIPE or ECONNRESET.
    def reset_at_once(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

    with RawServer(reset_at_once) as server:
        with pytest.raises(gaspar.RequestFailed) as caught:
            asyncio.run(request_async(server.address, bytes(16 * 1024 * 1024), timeout=10))

    assert isinstance(caught.value.__cause__, (ConnectionResetError, BrokenPipeError))


def test_request_async_timeout_while_sending():
    # The server never reads, so the client's buffer never drains and close() alone would wait forever.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            asyncio.run(request_async(address, bytes(64 * 1024 * 1024), timeout=0.5))
        elapsed = time.monotonic() - started

    assert elapsed < 2.5
    assert address in str(caught.value)


def test_request_async_loop_stays_free():
    # The server replies after 0.5 s, and a ticker task must keep running meanwhile.
    def reply_late(conn):
        read_request(conn)
        time.sleep(0.5)
        conn.sendall(b"late reply")

    async def request_while_ticking(address):
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            reply = await request_async(address, b"x", timeout=10)
        finally:
            ticker.cancel()
        return reply, ticks

    with RawServer(reply_late) as server:
        reply, ticks = asyncio.run(request_while_ticking(server.address))

    assert reply == b"late reply"
    # About 50 ticks fit in 0.5 s; a blocked loop would allow none.
    assert ticks >= 10


# -- request() under gevent ------------------------------------------------


def test_request_gevent_greenlets(start_producer):
    if importlib.util.find_spec("gevent") is None:
        pytest.skip("gevent is not installed; install the test extra with pip install '.[test]'")
    # Each request takes at least 0.1 s, so all 20 are in flight at once
    # unless request() blocks the gevent hub.
    producer = start_producer(sleep_briefly_then_echo)

    completed = subprocess.run(
        [sys.executable, "-c", GEVENT_CLIENT_SCRIPT, producer.address],
        capture_output=True,
        env=subprocess_env(),
        timeout=60,
    )

    assert completed.returncode == 0, completed.stderr.decode("utf-8", "replace")
    result = json.loads(completed.stdout)
    assert result["replies"] == ["greenlet %d" % number for number in range(20)]
    assert result["max_in_flight"] == 20
