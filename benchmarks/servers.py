"""The Python servers under test, each run as its own process by the harness.

    python -m benchmarks.servers gaspar|gaspar-prefetch4|asyncio-pool|python-inline --handler echo|sha256 [--rounds N] [--workers N]

Each listens on 127.0.0.1 at an ephemeral port, prints "PORT <n>" on stdout
once it can serve, and serves the gaspar wire protocol until SIGTERM or
SIGINT: a 4-byte big-endian length and the payload in, the handler's reply
and a FIN out, or a reset (RST) when the request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import logging
import select
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Dict, Optional

from benchmarks.handlers import HANDLER_NAMES, Handler, build_handler

HOST = "127.0.0.1"
BACKLOG = 1024
HEADER = struct.Struct("!I")
# The same limit as gaspar's default max_request_size.
MAX_REQUEST_SIZE = 64 * 1024 * 1024
# SO_LINGER on with a zero timeout: close() sends a reset.
LINGER_RESET = struct.pack("ii", 1, 0)
FIRST_READ_SIZE = 64 * 1024

log = logging.getLogger("benchmarks.servers")


class StopSignal:
    """A socket that becomes readable on SIGTERM or SIGINT, written through the signal wake-up fd.

    A signal handler that sets a threading.Event can deadlock when the
    signal lands while the main thread holds the Event's lock. A wake-up fd
    takes no lock.
    """

    def __init__(self) -> None:
        self.read_socket, self._write_socket = socket.socketpair()
        self.read_socket.setblocking(False)
        self._write_socket.setblocking(False)
        signal.set_wakeup_fd(self._write_socket.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: None)

    def wait(self, timeout: float) -> bool:
        """Return True once SIGTERM or SIGINT has arrived, waiting up to ``timeout`` seconds."""
        readable, _, _ = select.select([self.read_socket], [], [], timeout)
        return bool(readable)


def announce_port(port: int) -> None:
    """Tell the harness, which reads this process's stdout, where to connect."""
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


# -- gaspar -------------------------------------------------------------------


def serve_gaspar(handler: Handler, workers: int, **options: int) -> None:
    """Serve with gaspar.Producer: this process is the producer, the workers are forked.

    ``options`` are Producer options; none means the defaults.
    """
    import gaspar

    producer = gaspar.Producer(gaspar.Consumer(handler=handler), 0, processes=workers, host=HOST, **options)
    producer.start(blocking=False)
    # Installed after start(), so the fork server and workers keep their own signal setup.
    stop_signal = StopSignal()
    announce_port(producer.server_addr[1])

    while not stop_signal.wait(0.5):
        if producer.stopped.is_set():
            log.error("the producer stopped on its own")
            break
    producer.stop(timeout=60)
    log.info("producer stats at exit: %s", json.dumps(producer.stats()))


# -- asyncio + ProcessPoolExecutor --------------------------------------------


def serve_asyncio_pool(handler: Handler, workers: int) -> None:
    """Serve with asyncio streams and run each request's handler in a ProcessPoolExecutor."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        # Start every worker process now, so the first measured requests do
        # not pay for it: one task per worker, all in flight at once.
        warmup_tasks = [pool.submit(time.sleep, 0.05) for _ in range(workers)]
        for task in warmup_tasks:
            task.result()
        asyncio.run(_run_asyncio_pool(handler, pool))


async def _run_asyncio_pool(handler: Handler, pool: concurrent.futures.Executor) -> None:
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
            if size == 0:
                writer.close()
                return
            if size > MAX_REQUEST_SIZE:
                raise ValueError(f"request of {size} bytes is over the {MAX_REQUEST_SIZE}-byte limit")
            payload = await reader.readexactly(size)
            reply = await loop.run_in_executor(pool, handler, payload)
            writer.write(reply)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                _abort_with_reset(writer)
            else:
                writer.close()
        except Exception:
            log.exception("request failed")
            _abort_with_reset(writer)

    # A StreamReader pauses reading once it buffers 2 x limit bytes. 1 MiB
    # instead of the 64 KiB default lets a large body in with fewer pauses.
    server = await asyncio.start_server(handle, HOST, 0, backlog=BACKLOG, limit=1024 * 1024)
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    announce_port(server.sockets[0].getsockname()[1])
    async with server:
        await stop_requested.wait()


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
    writer.transport.abort()


# -- single-threaded selectors server, handler inline --------------------------


class InlineConnection:
    """One client connection of InlineServer and the single request it carries."""

    __slots__ = ("sock", "header", "body", "view", "received", "reply")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Bytes of the request received so far, until the header is complete.
        self.header = b""
        # The body buffer, sized from the header, and a memoryview for recv_into().
        self.body: Optional[bytearray] = None
        self.view: Optional[memoryview] = None
        self.received = 0
        # The rest of the reply to send.
        self.reply: Optional[memoryview] = None


class InlineServer:
    """A non-blocking selectors loop that runs the handler in its own thread, one request at a time."""

    def __init__(self, handler: Handler, listener: socket.socket) -> None:
        self.handler = handler
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.connections: Dict[int, InlineConnection] = {}

    def serve(self, stop_fd: int) -> None:
        """Serve until ``stop_fd`` becomes readable."""
        selector = self.selector
        selector.register(self.listener, selectors.EVENT_READ, None)
        selector.register(stop_fd, selectors.EVENT_READ, None)
        while True:
            for key, _ in selector.select():
                if key.fd == stop_fd:
                    return
                if key.fileobj is self.listener:
                    self._accept()
                elif key.data is _READ:
                    self._read(self.connections[key.fd])
                else:
                    self._write(self.connections[key.fd])

    def _accept(self) -> None:
        for _ in range(128):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            conn = InlineConnection(sock)
            self.connections[sock.fileno()] = conn
            # The request has often arrived with the handshake.
            self._read(conn, registered=False)

    def _read(self, conn: InlineConnection, registered: bool = True) -> None:
        try:
            payload = self._receive(conn)
        except BlockingIOError:
            payload = None
        except (OSError, ValueError):
            self._close(conn, reset=True, registered=registered)
            return
        if payload is None:
            if not registered:
                self.selector.register(conn.sock, selectors.EVENT_READ, _READ)
            return
        if registered:
            self.selector.unregister(conn.sock)
        if len(payload) == 0:
            self._close(conn, reset=False, registered=False)
            return

        try:
            reply = self.handler(payload)
        except Exception:
            log.exception("handler failed")
            self._close(conn, reset=True, registered=False)
            return
        conn.reply = memoryview(reply)
        self._write(conn, registered=False)

    def _receive(self, conn: InlineConnection):
        """Return the payload once the whole request is in, else None.

        Raises BlockingIOError when the socket has no more for now, ValueError
        on a request over the size limit or a close mid-frame, and OSError
        when the client resets.
        """
        sock = conn.sock
        while conn.body is None:
            data = sock.recv(FIRST_READ_SIZE)
            if not data:
                if conn.header:
                    raise ValueError("client closed the connection mid-frame")
                return b""
            data = conn.header + data
            if len(data) < HEADER.size:
                conn.header = data
                continue
            size = HEADER.unpack_from(data)[0]
            if size > MAX_REQUEST_SIZE:
                raise ValueError(f"request of {size} bytes is over the limit")
            end = HEADER.size + size
            if len(data) >= end:
                return data[HEADER.size : end]
            conn.body = bytearray(size)
            conn.view = memoryview(conn.body)
            conn.received = len(data) - HEADER.size
            conn.view[: conn.received] = data[HEADER.size :]

        while conn.received < len(conn.body):
            count = sock.recv_into(conn.view[conn.received :])
            if count == 0:
                raise ValueError("client closed the connection mid-frame")
            conn.received += count
        conn.view = None
        return conn.body

    def _write(self, conn: InlineConnection, registered: bool = True) -> None:
        try:
            while conn.reply:
                sent = conn.sock.send(conn.reply)
                conn.reply = conn.reply[sent:]
        except BlockingIOError:
            if not registered:
                self.selector.register(conn.sock, selectors.EVENT_WRITE, _WRITE)
            return
        except OSError:
            self._close(conn, reset=True, registered=registered)
            return
        self._close(conn, reset=False, registered=registered)

    def _close(self, conn: InlineConnection, reset: bool, registered: bool) -> None:
        if registered:
            self.selector.unregister(conn.sock)
        del self.connections[conn.sock.fileno()]
        if reset:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass
        conn.sock.close()


# Selector data naming the event a connection waits for.
_READ = "read"
_WRITE = "write"


def serve_python_inline(handler: Handler, workers: int) -> None:
    """Serve in this one thread with the handler inline; ``workers`` is ignored."""
    listener = socket.create_server((HOST, 0), backlog=BACKLOG)
    listener.setblocking(False)
    stop_signal = StopSignal()
    announce_port(listener.getsockname()[1])
    InlineServer(handler, listener).serve(stop_signal.read_socket.fileno())
    listener.close()


SERVERS = {
    "gaspar": serve_gaspar,
    "gaspar-prefetch4": functools.partial(serve_gaspar, prefetch=4),
    "asyncio-pool": serve_asyncio_pool,
    "python-inline": serve_python_inline,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run one benchmarked server until SIGTERM or SIGINT.")
    parser.add_argument("server", choices=sorted(SERVERS), help="which server to run")
    parser.add_argument("--handler", choices=HANDLER_NAMES, default="echo", help="request handler (default: echo)")
    parser.add_argument("--rounds", type=int, default=0, help="SHA-256 rounds of one sha256 request")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of gaspar and asyncio-pool (default: 2)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")

    handler = build_handler(arguments.handler, arguments.rounds)
    SERVERS[arguments.server](handler, arguments.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
