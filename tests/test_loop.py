"""Tests of the producer's event loop on real sockets."""

import selectors
import socket
import threading
import time

import pytest

from gaspar._loop import EventLoop


@pytest.fixture
def loop():
    event_loop = EventLoop(on_wake=lambda: None, on_signal=lambda signum: None)
    yield event_loop
    event_loop.close()


@pytest.fixture
def socket_pair():
    pair = socket.socketpair()
    yield pair
    for sock in pair:
        sock.close()


def test_loop_busy_poll_runs_callback_for_ready_socket(loop, socket_pair):
    reader, writer = socket_pair
    seen = []
    loop.register(reader, selectors.EVENT_READ, lambda sock, mask: seen.append(sock.recv(16)))
    writer.send(b"ready")

    loop.run_once(timeout=5.0, busy_poll=0.001)

    assert seen == [b"ready"]


def test_loop_busy_poll_then_sleeps_until_event(loop, socket_pair):
    reader, writer = socket_pair
    seen = []
    loop.register(reader, selectors.EVENT_READ, lambda sock, mask: seen.append(sock.recv(16)))
    # Sent well after the busy poll ends, so the loop must have gone on to sleep.
    sender = threading.Timer(0.2, writer.send, args=(b"late",))
    sender.start()
    try:
        loop.run_once(timeout=10.0, busy_poll=0.001)
    finally:
        sender.join()

    assert seen == [b"late"]


def test_loop_busy_poll_returns_after_timeout(loop, socket_pair):
    reader, _ = socket_pair
    loop.register(reader, selectors.EVENT_READ, lambda sock, mask: pytest.fail("no data was sent"))

    started = time.monotonic()
    loop.run_once(timeout=0.05, busy_poll=0.01)

    # Slack for clock granularity: the point is that it slept, not for how long exactly.
    assert time.monotonic() - started >= 0.04


def test_loop_zero_timeout_skips_busy_poll(loop, socket_pair):
    reader, _ = socket_pair
    loop.register(reader, selectors.EVENT_READ, lambda sock, mask: pytest.fail("no data was sent"))

    started = time.monotonic()
    loop.run_once(timeout=0, busy_poll=5.0)

    # A busy poll would have spun for five seconds.
    assert time.monotonic() - started < 4.0
