"""Tests of gaspar.consumers: Consumer, as_consumer and reply_to_buffer.

The daemon tests check what a worker does with each kind of handler return
value and with exceptions from handle() and setup(), over real sockets.
"""

import array
import concurrent.futures
import os
import re
import time

import pytest

import gaspar
from gaspar import client
from gaspar.consumers import Consumer, as_consumer, reply_to_buffer

from conftest import descendant_pids


def echo(message: bytes) -> bytes:
    return message


class Upper(Consumer):
    def handle(self, message: bytes) -> bytes:
        return message.upper()


class PidRecorder(Consumer):
    """Records the worker's pid and counts setup() calls; replies with "setup pid, serving pid, calls"."""

    def __init__(self) -> None:
        super().__init__()
        self.setup_pid = None
        self.setup_calls = 0

    def setup(self) -> None:
        self.setup_pid = os.getpid()
        self.setup_calls += 1

    def handle(self, message: bytes) -> str:
        # Keeps both workers busy at once, so both serve some requests.
        time.sleep(0.05)
        return f"{self.setup_pid} {os.getpid()} {self.setup_calls}"


class FailingSetup(Consumer):
    def setup(self) -> None:
        raise RuntimeError("the model file is missing")

    def handle(self, message: bytes) -> bytes:
        return message


def reply_by_kind(message: bytes):
    """Return a reply of the type that the request names, or raise."""
    kind = message.decode("ascii")
    if kind == "str":
        return "héllo wörld ✓"
    if kind == "bytearray":
        return bytearray(b"from a bytearray")
    if kind == "memoryview":
        return memoryview(b"from a memoryview")
    if kind == "int-array":
        return memoryview(array.array("i", [1, -2, 3]))
    if kind == "strided":
        return memoryview(b"abcdefgh")[::2]
    if kind == "large-bytearray":
        # Above the 64 KiB at which a reply travels in its own 0MQ frame.
        return bytearray(range(256)) * 1024
    if kind == "empty":
        return b""
    if kind == "none":
        return None
    if kind == "raise":
        raise ValueError("the handler failed on purpose")
    if kind == "pid":
        return str(os.getpid())
    raise AssertionError(f"unknown reply kind {kind!r}")


# -- Consumer construction ---------------------------------------------------


def test_consumer_without_handler_raises():
    with pytest.raises(TypeError, match="handler"):
        Consumer()


def test_consumer_non_callable_handler_raises():
    with pytest.raises(TypeError, match="handler must be callable, got str"):
        Consumer(handler="gaspar.examples:echo")


def test_consumer_subclass_without_handler():
    consumer = Upper()

    assert consumer.handle(b"abc") == b"ABC"


def test_consumer_handler_called():
    consumer = Consumer(handler=echo)

    assert consumer.handle(b"abc") == b"abc"


def test_consumer_setup_default_does_nothing():
    consumer = Consumer(handler=echo)

    assert consumer.setup() is None


def test_consumer_repr_names_handler():
    assert "echo" in repr(Consumer(handler=echo))


def test_as_consumer_wraps_function():
    consumer = as_consumer(echo)

    assert isinstance(consumer, Consumer)
    assert consumer.handler is echo


def test_as_consumer_keeps_consumer():
    consumer = Upper()

    assert as_consumer(consumer) is consumer


def test_as_consumer_rejects_non_callable():
    with pytest.raises(TypeError, match="got int"):
        as_consumer(42)


# -- reply_to_buffer ----------------------------------------------------------


@pytest.mark.parametrize(
    "reply, expected",
    [
        (b"bytes", b"bytes"),
        (bytearray(b"bytearray"), b"bytearray"),
        (memoryview(b"memoryview"), b"memoryview"),
        (memoryview(b"abcdefgh")[::2], b"aceg"),
        (memoryview(b"abcdefgh")[2:5], b"cde"),
        ("héllo ✓", "héllo ✓".encode("utf-8")),
        ("", b""),
        (b"", b""),
    ],
    ids=["bytes", "bytearray", "memoryview", "strided-memoryview", "sliced-memoryview", "str", "empty-str", "empty"],
)
def test_reply_to_buffer_converts(reply, expected):
    assert bytes(reply_to_buffer(reply)) == expected


def test_reply_to_buffer_int_array_memoryview():
    values = array.array("i", [1, -2, 3])

    buffer = memoryview(reply_to_buffer(memoryview(values)))

    # len() of a memoryview counts items; the reply must be counted in bytes.
    assert buffer.format == "B"
    assert buffer.nbytes == 3 * values.itemsize
    assert bytes(buffer) == values.tobytes()


def test_reply_to_buffer_keeps_bytes_object():
    reply = b"no copy"

    assert reply_to_buffer(reply) is reply


@pytest.mark.parametrize("reply", [None, 42, [b"a", b"b"], 1.5])
def test_reply_to_buffer_rejects_type(reply):
    with pytest.raises(TypeError) as caught:
        reply_to_buffer(reply)

    assert type(reply).__name__ in str(caught.value)


# -- Through a real daemon -----------------------------------------------------


# Request kinds for reply_by_kind and the reply bytes the client must receive.
REPLY_CASES = [
    ("str", "héllo wörld ✓".encode("utf-8")),
    ("bytearray", b"from a bytearray"),
    ("memoryview", b"from a memoryview"),
    ("int-array", array.array("i", [1, -2, 3]).tobytes()),
    ("strided", b"aceg"),
    ("large-bytearray", bytes(range(256)) * 1024),
    ("empty", b""),
]


def test_consumer_daemon_reply_types(start_producer):
    # One daemon for every case: starting and stopping one takes about 0.5 s.
    producer = start_producer(reply_by_kind, processes=1)

    for kind, expected in REPLY_CASES:
        reply = client.request(producer.address, kind.encode(), timeout=10)
        assert reply == expected, f"reply to {kind!r}"


def test_consumer_daemon_none_fails_request(start_producer):
    producer = start_producer(reply_by_kind, processes=1)

    with pytest.raises(gaspar.RequestFailed):
        client.request(producer.address, b"none", timeout=10)

    assert client.request(producer.address, b"str", timeout=10) == "héllo wörld ✓".encode("utf-8")


def test_consumer_daemon_error_keeps_worker(start_producer):
    producer = start_producer(reply_by_kind, processes=1)
    pid_before = client.request(producer.address, b"pid", timeout=10)

    for _ in range(3):
        with pytest.raises(gaspar.RequestFailed):
            client.request(producer.address, b"raise", timeout=10)

    pid_after = client.request(producer.address, b"pid", timeout=10)
    assert pid_after == pid_before


def test_consumer_daemon_setup_once_per_worker(start_producer):
    consumer = PidRecorder()
    producer = start_producer(consumer, processes=2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _: client.request(producer.address, b"x", timeout=10), range(12)))

    worker_pids = set(descendant_pids(os.getpid()))
    serving_pids = set()
    for reply in replies:
        setup_pid, serving_pid, setup_calls = (int(field) for field in reply.split())
        assert setup_pid == serving_pid
        assert serving_pid != os.getpid()
        assert serving_pid in worker_pids
        assert setup_calls == 1
        serving_pids.add(serving_pid)
    assert len(serving_pids) == 2
    # setup() ran in the workers after the fork, never in this process.
    assert consumer.setup_calls == 0


def test_consumer_setup_error_fails_start():
    producer = gaspar.Producer(FailingSetup(), 0, processes=2, startup_timeout=20)

    try:
        with pytest.raises(gaspar.StartupError) as caught:
            producer.start(blocking=False)
    finally:
        producer.stop(timeout=10)

    # The worker exits with code 3 (EXIT_BOOT_ERROR) when setup() raises.
    assert re.search(r"worker \d+ \(pid \d+\) exited with code 3 before it was ready", str(caught.value))
    assert not producer.running.is_set()
    assert descendant_pids(os.getpid()) == []
    # A second stop() of a producer that never started is harmless too.
    producer.stop(timeout=10)
