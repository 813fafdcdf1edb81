"""End-to-end tests of the daemon: real sockets, real worker processes, real 0MQ."""

import concurrent.futures
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

import gaspar
from gaspar import client
from gaspar.examples import echo

from conftest import descendant_pids, subprocess_env, wait_for


def pid_and_echo(message: bytes) -> bytes:
    """Reply with the serving worker's pid, a colon, then the request."""
    return b"%d:%s" % (os.getpid(), message)


def sleep_then_echo(message: bytes) -> bytes:
    """Sleep for the number of milliseconds the request starts with, then echo it."""
    milliseconds = int(message.split(b" ", 1)[0])
    time.sleep(milliseconds / 1000)
    return message


def raw_request(address, data: bytes, chunk_size: int = 0, half_close: bool = False) -> bytes:
    """Send raw bytes, optionally in chunks or followed by a half-close; read to EOF."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if chunk_size:
            for start in range(0, len(data), chunk_size):
                sock.sendall(data[start : start + chunk_size])
        else:
            sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


# -- Concurrency and dispatch --------------------------------------------------


def test_producer_many_concurrent_clients(start_producer):
    producer = start_producer(pid_and_echo, processes=4)
    messages = [b"request %d" % number for number in range(500)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(lambda message: client.request(producer.address, message, timeout=30), messages))

    worker_pids = {worker.pid for worker in producer.forker.processes}
    serving_pids = set()
    for message, reply in zip(messages, replies):
        pid_text, _, echoed = reply.partition(b":")
        assert echoed == message
        assert int(pid_text) in worker_pids
        serving_pids.add(int(pid_text))
    assert len(serving_pids) > 1


def test_producer_replies_out_of_order(start_producer):
    producer = start_producer(sleep_then_echo, processes=2)
    slow = b"600 slow"
    fast = [b"0 fast %d" % number for number in range(20)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        slow_future = pool.submit(client.request, producer.address, slow, 30)
        wait_for(lambda: any(worker.in_flight for worker in producer.forker.processes), 10, "slow request dispatched")
        fast_replies = list(pool.map(lambda message: client.request(producer.address, message, timeout=30), fast))
        fast_done = time.monotonic()
        assert slow_future.result() == slow
        slow_done = time.monotonic()

    assert fast_replies == fast
    # Every fast request was served by the free worker, not queued behind the slow one.
    assert fast_done < slow_done


def test_producer_dispatches_to_idle_worker(start_producer):
    producer = start_producer(sleep_then_echo, processes=2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        slow = pool.submit(client.request, producer.address, b"1500 slow", 30)
        wait_for(lambda: any(worker.in_flight for worker in producer.forker.processes), 10, "slow request dispatched")
        started = time.monotonic()
        assert client.request(producer.address, b"0 quick", timeout=30) == b"0 quick"
        quick_seconds = time.monotonic() - started
        assert slow.result() == b"1500 slow"

    assert quick_seconds < 1.0


# -- Payloads and client behaviour ---------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, 16 * 1024 * 1024], ids=["0B", "1B", "1MiB", "16MiB"])
def test_producer_echo_payload_sizes(start_producer, size):
    producer = start_producer(echo, processes=1)
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))

    reply = client.request(producer.address, payload, timeout=60)

    assert len(reply) == size
    assert reply == payload


def test_producer_frame_one_byte_at_a_time(start_producer):
    producer = start_producer(echo, processes=1)
    payload = bytes(range(256))

    reply = raw_request(producer.server_addr, client.pack(payload), chunk_size=1)

    assert reply == payload


def test_producer_client_half_close(start_producer):
    producer = start_producer(echo, processes=1)

    reply = raw_request(producer.server_addr, client.pack(b"half-closed"), half_close=True)

    assert reply == b"half-closed"


def test_producer_ignores_bytes_after_frame(start_producer):
    producer = start_producer(echo, processes=1)

    reply = raw_request(producer.server_addr, client.pack(b"first") + client.pack(b"second") + b"junk")

    assert reply == b"first"


def test_producer_serves_under_default_socket_timeout(start_producer):
    # Accepted sockets take the default timeout, under which a read that
    # finds no data would wait for it instead of returning at once.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        producer = start_producer(echo, processes=1)
        with socket.create_connection(producer.server_addr, timeout=10) as slow:
            slow.sendall(client.pack(b"slow")[:3])
            # The producer must not wait on the slow client to serve this one.
            started = time.monotonic()
            assert client.request(producer.address, b"fast", timeout=10) == b"fast"
            assert time.monotonic() - started < 4.0
            slow.sendall(client.pack(b"slow")[3:])
            slow.shutdown(socket.SHUT_WR)
            assert slow.recv(64) == b"slow"
    finally:
        socket.setdefaulttimeout(previous)


def test_producer_zero_length_request_closes(start_producer):
    producer = start_producer(echo, processes=1)

    reply = raw_request(producer.server_addr, struct.pack("!I", 0))

    assert reply == b""


def test_producer_rejects_oversized_request(start_producer):
    producer = start_producer(echo, processes=1, max_request_size=1024)

    with pytest.raises(gaspar.RequestFailed):
        client.request(producer.address, b"x" * 1025, timeout=10)
    with socket.create_connection(producer.server_addr, timeout=10) as sock:
        sock.sendall(struct.pack("!I", 0xFFFFFFFF))
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert client.request(producer.address, b"x" * 1024, timeout=10) == b"x" * 1024


def test_producer_handler_error_resets(start_producer):
    def fail_on_boom(message):
        if message == b"boom":
            raise ValueError("boom")
        return message

    producer = start_producer(fail_on_boom, processes=1)

    with pytest.raises(gaspar.RequestFailed) as failure:
        client.request(producer.address, b"boom", timeout=10)
    assert producer.address in str(failure.value)
    assert client.request(producer.address, b"fine", timeout=10) == b"fine"


def test_producer_serves_ipv6(start_producer):
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError as error:
        pytest.skip(f"IPv6 loopback is not available: {error}")
    producer = start_producer(echo, processes=1, host="::1")

    assert producer.address.startswith("[::1]:")
    assert client.request(producer.address, b"over IPv6", timeout=10) == b"over IPv6"


# -- Worker deaths -------------------------------------------------------------


def test_producer_fails_only_dead_workers_requests(start_producer):
    producer = start_producer(sleep_then_echo, processes=2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        doomed = pool.submit(client.request, producer.address, b"5000 doomed", 30)
        busy = wait_for(
            lambda: [worker for worker in producer.forker.processes if worker.in_flight], 10, "request dispatched"
        )
        survivor = pool.submit(client.request, producer.address, b"300 survivor", 30)
        wait_for(lambda: all(worker.in_flight for worker in producer.forker.processes), 10, "both workers busy")
        os.kill(busy[0].pid, 9)

        with pytest.raises(gaspar.RequestFailed):
            doomed.result()
        assert survivor.result() == b"300 survivor"

    wait_for(lambda: len(producer.forker.processes) == 2, 10, "a replacement worker")
    assert busy[0].pid not in {worker.pid for worker in producer.forker.processes}
    assert client.request(producer.address, b"0 after", timeout=10) == b"0 after"


# -- Lifecycle and public API ----------------------------------------------------


def test_producer_public_api(start_producer):
    producer = gaspar.Producer(gaspar.Consumer(handler=echo), 0, processes=2)
    assert not producer.running.is_set()

    producer.start(blocking=False)
    try:
        host, port = producer.server_addr
        assert host == "127.0.0.1"
        assert port > 0
        assert producer.running.is_set()
        assert not producer.stopped.is_set()
        workers = producer.forker.processes
        assert len(workers) == 2
        assert all(worker.is_alive() for worker in workers)
        assert client.request(f"{host}:{port}", b"api", timeout=10) == b"api"
    finally:
        producer.stop(timeout=30)

    assert producer.stopped.is_set()
    assert not producer.running.is_set()
    assert not any(worker.is_alive() for worker in workers)
    assert descendant_pids(os.getpid()) == []


def test_producer_restarts_after_stop():
    producer = gaspar.Producer(echo, 0, processes=1)
    for round_number in range(3):
        producer.start(blocking=False)
        try:
            assert client.request(producer.address, b"round %d" % round_number, timeout=10) == b"round %d" % round_number
        finally:
            producer.stop(timeout=30)
        assert descendant_pids(os.getpid()) == []


def test_producer_port_in_use_raises():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        producer = gaspar.Producer(echo, port, processes=1)
        with pytest.raises(gaspar.StartupError) as failure:
            producer.start(blocking=False)
    assert f"127.0.0.1:{port}" in str(failure.value)
    assert not producer.running.is_set()


def test_producer_stop_waits_for_in_flight(start_producer):
    producer = start_producer(sleep_then_echo, processes=1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(client.request, producer.address, b"500 finishing", 30)
        wait_for(lambda: any(worker.in_flight for worker in producer.forker.processes), 10, "request dispatched")
        producer.stop(timeout=30)
        assert pending.result() == b"500 finishing"

    with pytest.raises(ConnectionRefusedError):
        client.request(producer.address, b"too late", timeout=5)


ORIGINAL_EXAMPLE = textwrap.dedent(
    """
    import logging
    import gaspar

    def echo(message):
        return message

    logging.basicConfig(level=logging.INFO)
    consumer = gaspar.Consumer(handler=echo)
    producer = gaspar.Producer(consumer, 0, processes=2)
    producer.start()
    """
)


def test_producer_blocking_start_stops_on_sigterm(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(ORIGINAL_EXAMPLE)
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, env=subprocess_env())
    try:
        log_lines = []
        address = None
        deadline = time.monotonic() + 30
        while address is None and time.monotonic() < deadline:
            line = process.stderr.readline().decode()
            if not line:
                break
            log_lines.append(line)
            if "listening on " in line:
                address = line.split("listening on ", 1)[1].split()[0]
        assert address is not None, "".join(log_lines)

        assert client.request(address, b"original API", timeout=10) == b"original API"

        process.send_signal(15)
        assert process.wait(timeout=30) == 0
        remaining = process.stderr.read().decode()
        assert "stopped" in remaining
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
