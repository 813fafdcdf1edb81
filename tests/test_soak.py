"""Soak test: a daemon under a random mix of healthy and faulty requests for 30 s.

Client threads pick at random among healthy requests and every kind of fault
a client or handler can cause. Healthy requests must all come back intact,
faulty ones must all fail, and the producer must neither leak memory nor
leave processes behind.
"""

import os
import random
import socket
import threading
import time

import pytest

import gaspar
from gaspar import client

from conftest import wait_for

SOAK_SECONDS = 30
WARM_UP_SECONDS = 5
CLIENT_THREADS = 6
MAX_REQUEST_SIZE = 64 * 1024
MAX_RSS_GROWTH = 50 * 1024 * 1024
REQUEST_TIMEOUT = 30


def act_on_first_byte(message: bytes) -> bytes:
    """Echo b"h..." requests; raise on b"r", exit the worker on b"c", hang 5 s on b"s"."""
    kind = message[:1]
    if kind == b"r":
        raise RuntimeError("request kind b'r' makes the handler raise")
    if kind == b"c":
        os._exit(1)
    if kind == b"s":
        time.sleep(5)
    return message


def resident_bytes() -> int:
    """Return this process's resident set size in bytes, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def healthy_payload(rng: random.Random) -> bytes:
    return b"h" + rng.randbytes(rng.randint(0, 4096))


def expect_failure(address: str, message: bytes):
    """Send a request that must fail; return None when it did, else what happened instead."""
    try:
        reply = client.request(address, message, timeout=REQUEST_TIMEOUT)
    except gaspar.RequestFailed:
        return None
    except Exception as exc:  # every other outcome is a finding, reported with the request
        return f"raised {exc!r}"
    return f"got a reply of {len(reply)} bytes"


def send_healthy(address: str, rng: random.Random):
    message = healthy_payload(rng)
    try:
        reply = client.request(address, message, timeout=REQUEST_TIMEOUT)
    except Exception as exc:  # every failure of a healthy request is a finding
        return f"raised {exc!r}"
    if reply != message:
        return f"got a wrong reply of {len(reply)} bytes for {len(message)}"
    return None


def send_raising(address: str, rng: random.Random):
    return expect_failure(address, b"r" + rng.randbytes(16))


def send_crashing(address: str, rng: random.Random):
    return expect_failure(address, b"c" + rng.randbytes(16))


def send_hanging(address: str, rng: random.Random):
    return expect_failure(address, b"s" + rng.randbytes(16))


def send_oversized(address: str, rng: random.Random):
    return expect_failure(address, b"h" * (70 * 1024))


def send_slow(address: str, rng: random.Random):
    """Send the header and half the body, then stall until the read timeout resets the connection."""
    frame = client.pack(healthy_payload(rng) + b"tail")
    host, port = client.parse_address(address)
    with socket.create_connection((host, port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(frame[: len(frame) // 2])
        # The stall: nothing more is sent while the client waits for the reset.
        sock.settimeout(5)
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            return None
        except socket.timeout:
            return "was not reset within 5 s"
    return f"got {data!r} instead of a reset"


def send_and_leave(address: str, rng: random.Random):
    """Send a whole healthy request and close without reading the reply."""
    host, port = client.parse_address(address)
    with socket.create_connection((host, port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(client.pack(healthy_payload(rng)))
    return None


# Action name -> (function, weight). Half the picks are healthy requests. A
# hanging request occupies one of the two workers for the whole 1 s timeout,
# so it gets half the weight of the other faults.
ACTIONS = {
    "healthy": (send_healthy, 11),
    "raising": (send_raising, 2),
    "crashing": (send_crashing, 2),
    "hanging": (send_hanging, 1),
    "oversized": (send_oversized, 2),
    "slow": (send_slow, 2),
    "leaving": (send_and_leave, 2),
}


class SoakClient(threading.Thread):
    """A client thread that runs random actions until ``stop`` is set, counting outcomes per action."""

    def __init__(self, address: str, seed: int, stop: threading.Event) -> None:
        super().__init__(name=f"soak-client-{seed}", daemon=True)
        self.address = address
        self.rng = random.Random(seed)
        self.stop = stop
        self.counts = {name: 0 for name in ACTIONS}
        self.unexpected = []

    def run(self) -> None:
        names = list(ACTIONS)
        weights = [ACTIONS[name][1] for name in names]
        while not self.stop.is_set():
            name = self.rng.choices(names, weights)[0]
            action = ACTIONS[name][0]
            try:
                problem = action(self.address, self.rng)
            except Exception as exc:  # a broken action is reported, not allowed to end the thread
                problem = f"raised {exc!r}"
            self.counts[name] += 1
            if problem is not None:
                self.unexpected.append(f"{name}: {problem}")


@pytest.mark.timeout(120)
def test_soak_mixed_faults(start_producer):
    producer = start_producer(
        act_on_first_byte,
        processes=2,
        timeout=1.0,
        read_timeout=1.0,
        max_request_size=MAX_REQUEST_SIZE,
    )
    stop = threading.Event()
    clients = [SoakClient(producer.address, seed, stop) for seed in range(CLIENT_THREADS)]
    started = time.monotonic()
    for soak_client in clients:
        soak_client.start()
    try:
        stop.wait(WARM_UP_SECONDS)
        rss_after_warm_up = resident_bytes()
        stop.wait(SOAK_SECONDS - (time.monotonic() - started))
    finally:
        stop.set()
        for soak_client in clients:
            soak_client.join(REQUEST_TIMEOUT + 5)
    rss_at_end = resident_bytes()

    counts = {name: sum(soak_client.counts[name] for soak_client in clients) for name in ACTIONS}
    unexpected = [problem for soak_client in clients for problem in soak_client.unexpected]
    healthy_failures = [problem for problem in unexpected if problem.startswith("healthy:")]
    fault_surprises = [problem for problem in unexpected if not problem.startswith("healthy:")]

    assert not any(soak_client.is_alive() for soak_client in clients)
    assert counts["healthy"] > 200, counts
    assert healthy_failures == []
    assert fault_surprises == []
    assert all(count > 0 for count in counts.values()), counts

    assert producer.running.is_set()
    assert client.request(producer.address, b"h still serving", timeout=10) == b"h still serving"

    # Every accepted connection is counted once, as a success or under one failure cause.
    wait_for(lambda: not producer._connections, 10, "the producer to close every connection")
    stats = producer.stats()
    assert stats["accepted"] == stats["succeeded"] + sum(stats["failed"].values())
    # The producer counts a restart when the fork server reports the exit,
    # which may come after the request has already failed.
    crashes = counts["crashing"] + counts["hanging"]
    wait_for(lambda: producer.stats()["worker_restarts"] >= crashes, 10, f"{crashes} worker restarts")

    assert rss_at_end - rss_after_warm_up < MAX_RSS_GROWTH
