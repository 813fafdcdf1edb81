"""Micro-benchmark of the hop gaspar adds: one 0MQ round trip between two processes.

Run from the repository root::

    python -m benchmarks.zmq_roundtrip              # 5,000 round trips per mode
    python -m benchmarks.zmq_roundtrip --count 500  # a smoke test

A forked echo process and this one exchange a 25-byte message over two
``ipc://`` PUSH/PULL pairs, as the producer and a worker do. Two modes wait
for the reply in different ways:

- ``sleep``: block in zmq_poll(), so the thread sleeps and is woken;
- ``busy-poll``: call recv(NOBLOCK) in a loop, so the thread never sleeps.

The gap between their medians is the cost of one thread wake-up on this
machine, which the producer's busy poll avoids.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import List

import zmq

MESSAGE = b"\0" * 25
WARM_UP = 100
# Seconds the echo process waits before it exits, so its last reply is sent.
ECHO_LINGER = 0.5
# The echo process gives up after this many milliseconds without a message,
# so it ends even when this process fails midway.
ECHO_IDLE_TIMEOUT_MS = 10_000


def run_echo(request_endpoint: str, reply_endpoint: str, count: int) -> None:
    """Echo ``count`` messages; runs in the forked process."""
    context = zmq.Context(io_threads=1)
    requests = context.socket(zmq.PULL)
    requests.setsockopt(zmq.RCVTIMEO, ECHO_IDLE_TIMEOUT_MS)
    requests.bind(request_endpoint)
    replies = context.socket(zmq.PUSH)
    replies.connect(reply_endpoint)
    for _ in range(count):
        replies.send(requests.recv())
    time.sleep(ECHO_LINGER)


def measure(push: zmq.Socket[bytes], pull: zmq.Socket[bytes], count: int, busy_poll: bool) -> List[float]:
    """Return ``count`` round-trip times in seconds."""
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        push.send(MESSAGE)
        if busy_poll:
            while True:
                try:
                    pull.recv(zmq.NOBLOCK)
                    break
                except zmq.Again:
                    pass
        else:
            poller.poll()
            pull.recv()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="round trips per mode (default: 5000)")
    arguments = parser.parse_args()
    modes = (("sleep", False), ("busy-poll", True))

    directory = tempfile.mkdtemp(prefix="gaspar-roundtrip-")
    request_endpoint = f"ipc://{directory}/requests"
    reply_endpoint = f"ipc://{directory}/replies"
    echo_count = WARM_UP + arguments.count * len(modes)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run_echo(request_endpoint, reply_endpoint, echo_count)
            code = 0
        finally:
            os._exit(code)

    context = zmq.Context(io_threads=1)
    push = context.socket(zmq.PUSH)
    pull = context.socket(zmq.PULL)
    try:
        push.connect(request_endpoint)
        pull.bind(reply_endpoint)
        measure(push, pull, WARM_UP, busy_poll=False)
        for name, busy_poll in modes:
            times = sorted(measure(push, pull, arguments.count, busy_poll))
            p50 = statistics.median(times) * 1e6
            p99 = times[int(len(times) * 0.99)] * 1e6
            print(f"{name:10} p50 {p50:6.1f} µs   p99 {p99:6.1f} µs   ({len(times):,} round trips)")
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
        os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
