"""Producer: the TCP front end and the loop that dispatches requests to workers.

One thread runs one ``selectors`` loop over the listening socket, every
client connection, the 0MQ socket that carries replies, the fork server's
control socket and each worker's sentinel. A connection moves through four
states::

    READING ──frame complete──> QUEUED ──a worker is free──> DISPATCHED
                                  └──────a worker is free─────────┘
    DISPATCHED ──reply arrives──> WRITING ──reply sent──> closed (FIN)

Any failure on the way (a frame over the size limit, a read timeout, a
handler error, a worker's death, a stop) ends the connection with a reset.
"""

from __future__ import annotations

import collections
import errno
import functools
import heapq
import itertools
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

import zmq

from gaspar import _messages
from gaspar._constants import DEFAULT_MAX_REQUEST_SIZE, HEADER_SIZE, MAX_FRAME_SIZE
from gaspar._worker import WorkerLoop
from gaspar.consumers import Consumer, Handler, as_consumer
from gaspar.errors import FrameTooLarge, GasparError, StartupError
from gaspar.framing import FrameParser, unpack_header
from gaspar.workers import EXITED, FORK_FAILED, SPAWNED, Forker, WorkerProcess, describe_wait_status

log = logging.getLogger(__name__)

# The first recv of a connection reads up to this many bytes. A larger size
# makes the allocator map and unmap memory on every request.
FIRST_READ_SIZE = 64 * 1024
# Connections accepted per wake-up of the listening socket.
ACCEPT_BATCH = 128
# Reads of one connection per wake-up, so one fast sender cannot starve others.
READ_BATCH = 16
# 0MQ messages handled per wake-up before other sockets get a turn.
REPLY_BATCH = 256
# Bytes of unread input drained before a clean close: closing a socket with
# unread input makes Linux send a reset instead of a FIN.
DRAIN_BEFORE_CLOSE = 4 * 64 * 1024
# How long accepting pauses after the process runs out of file descriptors.
ACCEPT_PAUSE = 0.5
# Consecutive workers that may die before becoming ready, after startup,
# before the producer gives up, and the delay before each retry.
MAX_BOOT_FAILURES = 5
BOOT_RETRY_DELAY = 0.5

# SO_LINGER on with a zero timeout: close() sends a reset and drops unsent data.
LINGER_RESET = struct.pack("ii", 1, 0)

_LOOP_THREAD_NAME = "gaspar-producer"

READING = 1
QUEUED = 2
DISPATCHED = 3
WRITING = 4
CLOSED = 5


class _Connection:
    """One client connection and the single request it carries."""

    __slots__ = ("sock", "peer", "parser", "state", "request_id", "payload", "worker", "reply", "deadline", "events")

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.parser: Optional[FrameParser] = None
        self.state = READING
        self.request_id = 0
        self.payload = None
        self.worker: Optional[WorkerProcess] = None
        self.reply: Optional[memoryview] = None
        self.deadline = 0.0
        # The selector events this connection is registered for; 0 when none.
        self.events = 0


def format_address(host: str, port: int) -> str:
    """Return "host:port", with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Producer:
    """A TCP daemon that hands each request to one of N worker processes.

    ``consumer`` is a Consumer or a plain handler function. ``processes``
    defaults to os.cpu_count(). Limits, all optional:

    - ``max_request_size``: largest request payload in bytes; a larger length
      prefix resets the connection before the body is read.
    - ``read_timeout``: seconds a client has to deliver its whole request.
    - ``graceful_timeout``: seconds stop() waits for requests in flight.
    - ``startup_timeout``: seconds start() waits for every worker to be ready.
    - ``prefetch``: requests one worker may hold at once. With 1, a request
      goes only to an idle worker and never waits behind another.
    - ``kill_timeout``: seconds workers get to exit after SIGTERM on stop.
    """

    def __init__(
        self,
        consumer: Union[Consumer, Handler],
        port: int,
        processes: Optional[int] = None,
        host: str = "127.0.0.1",
        *,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        read_timeout: float = 30.0,
        graceful_timeout: float = 30.0,
        startup_timeout: float = 60.0,
        prefetch: int = 1,
        kill_timeout: float = 10.0,
        backlog: int = 1024,
    ) -> None:
        self.consumer = as_consumer(consumer)
        self.port = _check_int("port", port, 0, 65535)
        if processes is None:
            processes = os.cpu_count() or 1
        self.processes = _check_int("processes", processes, 1, 4096)
        self.host = host
        self.max_request_size = _check_int("max_request_size", max_request_size, 0, MAX_FRAME_SIZE)
        self.read_timeout = _check_seconds("read_timeout", read_timeout)
        self.graceful_timeout = _check_seconds("graceful_timeout", graceful_timeout, allow_zero=True)
        self.startup_timeout = _check_seconds("startup_timeout", startup_timeout)
        self.prefetch = _check_int("prefetch", prefetch, 1, 1 << 20)
        self.backlog = _check_int("backlog", backlog, 1, 1 << 20)

        self.forker = Forker(self._run_worker, kill_timeout=_check_seconds("kill_timeout", kill_timeout))
        self.server_addr: Optional[Tuple[str, int]] = None
        self.running = threading.Event()
        self.stopped = threading.Event()
        self._loop_thread: Optional[threading.Thread] = None
        self._active = False
        self._stop_requested = False
        self._error: Optional[BaseException] = None

    # -- public API -------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound address as "host:port", for gaspar.client.request()."""
        if self.server_addr is None:
            raise RuntimeError("the producer is not listening; call start() first")
        return format_address(*self.server_addr)

    def start(self, blocking: bool = True) -> None:
        """Listen, fork the workers and serve.

        With ``blocking`` (the default), serve in this thread until SIGINT,
        SIGTERM or stop(), then drain and return. SIGINT and SIGTERM handlers
        are installed only then, and only in the main thread. Without it,
        return once the socket listens and every worker is ready, and serve
        from a background thread.

        Raises StartupError when the address cannot be bound or a worker
        fails to start, after cleaning up everything already started.
        """
        if self._active:
            raise RuntimeError("the producer is already started")
        try:
            self._setup()
            self._start_workers()
        except BaseException:
            self._teardown()
            raise

        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._active = True
        self.stopped.clear()
        self.running.set()
        log.info(
            "listening on %s with %d workers (framing: %s)",
            self.address,
            self.processes,
            _framing_implementation(),
        )

        if not blocking:
            self._loop_thread = threading.Thread(target=self._serve_forever, name=_LOOP_THREAD_NAME, daemon=True)
            self._loop_thread.start()
            return

        self._loop_thread = threading.current_thread()
        restore_signals = self._install_signal_handlers()
        try:
            self._serve_forever()
        finally:
            restore_signals()
        if self._error is not None:
            raise self._error

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, let requests in flight finish, then end every worker.

        Requests still in flight after ``graceful_timeout`` fail. Waits up
        to ``timeout`` seconds (None: no limit) for the producer to stop,
        unless called from the producer's own thread.
        """
        if not self._active:
            return
        self._stop_requested = True
        self._wake()
        thread = self._loop_thread
        if thread is threading.current_thread():
            return
        self.stopped.wait(timeout)
        if thread is not None and thread.name == _LOOP_THREAD_NAME:
            thread.join(timeout)

    # -- setup and teardown ---------------------------------------------

    def _setup(self) -> None:
        """Create every resource; _teardown() can undo any prefix of this."""
        self._error = None
        self._stop_requested = False
        self._listener: Optional[socket.socket] = None
        self._context: Optional[zmq.Context] = None
        self._replies = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._drain_deadline = 0.0

        self._connections: Dict[int, _Connection] = {}
        self._in_flight: Dict[int, _Connection] = {}
        self._queue: Deque[_Connection] = collections.deque()
        self._reading: Deque[_Connection] = collections.deque()
        self._request_ids = itertools.count(1)
        self._ready: List[WorkerProcess] = []
        self._early_ready: Dict[int, int] = {}
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._boot_failures = 0
        self._replies_pending = False
        self._accept_paused = False
        self._rejections: collections.Counter = collections.Counter()

        self._runtime_dir = None
        self._runtime_dir = tempfile.mkdtemp(prefix="gaspar-")
        # Fork the fork server first: this process runs no thread of ours yet,
        # and holds no listening socket or 0MQ context for workers to inherit.
        self.forker.start()
        self._selector.register(self.forker.fileno(), selectors.EVENT_READ, self._handle_forker_events)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._handle_wake)

        self._listener = self._listen()
        self.server_addr = self._listener.getsockname()[:2]

        self._context = zmq.Context(io_threads=1)
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.RCVHWM, 0)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(self._reply_endpoint())
        self._selector.register(self._replies.getsockopt(zmq.FD), selectors.EVENT_READ, self._drain_replies)

    def _listen(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StartupError(f"cannot resolve host {self.host!r}: {exc}") from exc

        errors = []
        for family, _, _, _, address in infos:
            try:
                listener = socket.create_server(address, family=family, backlog=self.backlog)
            except OSError as exc:
                errors.append(exc)
                continue
            listener.setblocking(False)
            return listener

        raise StartupError(
            f"cannot listen on {format_address(self.host, self.port)}: {errors[0].strerror}; "
            "choose another port or stop the process that holds it"
        ) from errors[0]

    def _start_workers(self) -> None:
        for _ in range(self.processes):
            self.forker.spawn()

        deadline = time.monotonic() + self.startup_timeout
        while len(self._ready) < self.processes:
            if self._error is not None:
                raise self._error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartupError(
                    f"only {len(self._ready)} of {self.processes} workers were ready after "
                    f"{self.startup_timeout} s; raise startup_timeout if setup() is slow"
                )
            self._poll(min(remaining, 1.0))

    def _teardown(self) -> None:
        for conn in list(self._connections.values()):
            self._reset(conn)
        for worker in self.forker.workers.values():
            if worker.push is not None:
                worker.push.close(linger=0)
                worker.push = None
        self._ready.clear()
        # The Forker closes the sentinels, so the selector goes first.
        self._selector.close()

        for event in self.forker.close():
            self._log_forker_event(event)

        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._replies is not None:
            self._replies.close(linger=0)
            self._replies = None
        if self._context is not None:
            self._context.term()
            self._context = None
        self._wake_r.close()
        self._wake_w.close()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def _install_signal_handlers(self) -> Callable[[], None]:
        """Route SIGINT and SIGTERM to the loop; return a function that undoes it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        # The wake-up fd delivers the signal number to the loop; the Python
        # handler has nothing left to do.
        for signum in previous:
            signal.signal(signum, lambda signum, frame: None)
        previous_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(previous_wakeup_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    # -- the loop ---------------------------------------------------------

    def _serve_forever(self) -> None:
        try:
            while not self._stopping or self._has_work_to_drain():
                self._poll(self._next_timeout())
        except BaseException as exc:
            log.exception("producer loop failed; stopping")
            self._error = exc
        finally:
            self._finish_stop()

    def _poll(self, timeout: Optional[float]) -> None:
        if self._replies_pending:
            timeout = 0
        for key, mask in self._selector.select(timeout):
            key.data(key.fileobj, mask)
        if self._replies_pending:
            self._drain_replies(None, 0)

        now = time.monotonic()
        self._run_timers(now)
        self._expire_reads(now)

    def _next_timeout(self) -> float:
        timeout = 1.0
        now = time.monotonic()
        if self._timers:
            timeout = min(timeout, self._timers[0][0] - now)
        if self._reading:
            timeout = min(timeout, self._reading[0].deadline - now)
        if self._stopping:
            timeout = min(timeout, self._drain_deadline - now)
        return max(timeout, 0.0)

    def _call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), callback))

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            # A full buffer already holds a wake-up; a closed one means stopped.
            pass

    def _handle_wake(self, sock, mask) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for value in data:
            if value == 0:
                if self._stop_requested:
                    self._begin_stop()
            elif value in (signal.SIGINT, signal.SIGTERM):
                if self._stopping:
                    log.warning("second %s: stopping now", signal.Signals(value).name)
                    self._drain_deadline = time.monotonic()
                else:
                    log.info("%s received: stopping", signal.Signals(value).name)
                    self._begin_stop()

    # -- stopping -----------------------------------------------------------

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._drain_deadline = time.monotonic() + self.graceful_timeout
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for conn in list(self._connections.values()):
            if conn.state == READING:
                self._reset(conn)
        log.info(
            "stopping: %d requests in flight, %d queued, waiting up to %s s",
            len(self._in_flight),
            len(self._queue),
            self.graceful_timeout,
        )

    def _has_work_to_drain(self) -> bool:
        if time.monotonic() >= self._drain_deadline:
            return False
        return bool(self._connections)

    def _finish_stop(self) -> None:
        left = len(self._connections)
        if left:
            log.warning("failing %d requests still unfinished at stop", left)
        self._teardown()
        self._active = False
        self.running.clear()
        self.stopped.set()
        log.info("stopped")

    # -- connections ------------------------------------------------------

    def _accept(self, listener, mask) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            conn = _Connection(sock, peer)
            self._connections[sock.fileno()] = conn
            self._read(conn)
            if conn.state == READING:
                conn.deadline = time.monotonic() + self.read_timeout
                self._reading.append(conn)
                self._watch(conn, selectors.EVENT_READ)

    def _pause_accepting(self, exc: OSError) -> None:
        self._count_rejection("accept failed", f"{exc.strerror}; pausing accept for {ACCEPT_PAUSE} s")
        if self._accept_paused or self._listener is None:
            return
        self._accept_paused = True
        self._selector.unregister(self._listener)

        def resume() -> None:
            self._accept_paused = False
            if self._listener is not None:
                self._selector.register(self._listener, selectors.EVENT_READ, self._accept)

        self._call_later(ACCEPT_PAUSE, resume)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.events == events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, self._handle_connection)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, self._handle_connection)
        conn.events = events

    def _handle_connection(self, sock, mask) -> None:
        conn = self._connections.get(sock.fileno())
        if conn is None:
            return
        if conn.state == READING:
            self._read(conn)
        elif conn.state == WRITING:
            self._write(conn)

    def _read(self, conn: _Connection) -> None:
        """Read what the client has sent; dispatch once the frame is complete."""
        sock = conn.sock
        try:
            if conn.parser is None:
                data = sock.recv(FIRST_READ_SIZE)
                if not data:
                    # Closed before sending anything: nothing to answer.
                    self._close(conn)
                    return
                if self._read_first_chunk(conn, data):
                    return

            parser = conn.parser
            for _ in range(READ_BATCH):
                received = sock.recv_into(parser.get_buffer())
                if received == 0:
                    self._count_rejection("truncated request", "the client closed the connection mid-frame")
                    self._reset(conn)
                    return
                parser.buffer_updated(received)
                payload = parser.next_frame()
                if payload is not None:
                    conn.parser = None
                    self._dispatch(conn, payload)
                    return
        except BlockingIOError:
            return
        except FrameTooLarge as exc:
            self._count_rejection("request too large", str(exc))
            self._reset(conn)
        except OSError:
            # A reset or other error from the client: nobody is left to answer.
            self._reset(conn)

    def _read_first_chunk(self, conn: _Connection, data: bytes) -> bool:
        """Handle the connection's first read; return True when the request is settled.

        A request that arrives whole (the usual case) skips the parser.
        Bytes after the frame are ignored.
        """
        if len(data) >= HEADER_SIZE:
            size = unpack_header(data)
            if size > self.max_request_size:
                raise FrameTooLarge(size, self.max_request_size)
            end = HEADER_SIZE + size
            if len(data) >= end:
                if size == 0:
                    # A zero-length request is closed without a reply.
                    self._close(conn)
                else:
                    self._dispatch(conn, memoryview(data)[HEADER_SIZE:end])
                return True
            data = memoryview(data)[:end]

        conn.parser = FrameParser(self.max_request_size)
        conn.parser.feed(data)
        return False

    def _dispatch(self, conn: _Connection, payload) -> None:
        self._watch(conn, 0)
        if len(payload) == 0:
            self._close(conn)
            return
        conn.request_id = next(self._request_ids)
        worker = self._pick_worker()
        if worker is None:
            conn.state = QUEUED
            conn.payload = payload
            self._queue.append(conn)
            return
        self._send_request(worker, conn, payload)

    def _pick_worker(self) -> Optional[WorkerProcess]:
        best = None
        best_load = self.prefetch
        for worker in self._ready:
            load = len(worker.in_flight)
            if load < best_load:
                best = worker
                best_load = load
                if load == 0:
                    break
        return best

    def _send_request(self, worker: WorkerProcess, conn: _Connection, payload) -> None:
        request_id = conn.request_id
        try:
            _messages.send_message(worker.push, _messages.REQUEST, request_id, payload)
        except zmq.ZMQError as exc:
            log.error("request %d: sending to worker %d failed: %s", request_id, worker.worker_id, exc)
            self._reset(conn)
            return
        conn.state = DISPATCHED
        conn.payload = None
        conn.worker = worker
        worker.in_flight.add(request_id)
        self._in_flight[request_id] = conn

    def _dispatch_queued(self) -> None:
        while self._queue:
            worker = self._pick_worker()
            if worker is None:
                return
            conn = self._queue.popleft()
            if conn.state == QUEUED:
                self._send_request(worker, conn, conn.payload)

    def _write(self, conn: _Connection) -> None:
        reply = conn.reply
        try:
            sent = conn.sock.send(reply)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The client left before its reply was sent; the reply is dropped.
            self._reset(conn)
            return
        if sent == len(reply):
            self._close(conn)
            return
        conn.reply = reply[sent:]
        conn.state = WRITING
        self._watch(conn, selectors.EVENT_WRITE)

    def _close(self, conn: _Connection) -> None:
        """Close after a complete reply: the client reads a FIN."""
        sock = conn.sock
        try:
            drained = 0
            while drained < DRAIN_BEFORE_CLOSE:
                data = sock.recv(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass
        self._forget(conn)
        sock.close()

    def _reset(self, conn: _Connection) -> None:
        """Close with a reset: the protocol's signal that the request failed."""
        sock = conn.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
        self._forget(conn)
        sock.close()

    def _forget(self, conn: _Connection) -> None:
        if conn.state == CLOSED:
            return
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        if conn.state == DISPATCHED:
            self._in_flight.pop(conn.request_id, None)
        conn.state = CLOSED
        conn.parser = None
        conn.payload = None
        conn.reply = None
        self._connections.pop(conn.sock.fileno(), None)

    def _expire_reads(self, now: float) -> None:
        reading = self._reading
        while reading and reading[0].deadline <= now:
            conn = reading.popleft()
            if conn.state == READING:
                self._count_rejection("read timeout", f"no complete request within {self.read_timeout} s")
                self._reset(conn)

    def _count_rejection(self, cause: str, detail: str) -> None:
        """Log a rejected request once per cause, then every 1000th time with a count."""
        self._rejections[cause] += 1
        count = self._rejections[cause]
        if count == 1 or count % 1000 == 0:
            log.warning("rejected %d requests so far: %s (%s)", count, cause, detail)

    # -- replies and workers ------------------------------------------------

    def _drain_replies(self, fd, mask) -> None:
        """Handle every waiting 0MQ message, or REPLY_BATCH of them.

        The 0MQ descriptor is edge-triggered: it signals only when the socket's
        state changes, so the socket must be read until EVENTS shows no input,
        or the loop would never hear of the messages left behind.
        """
        replies = self._replies
        for _ in range(REPLY_BATCH):
            if not replies.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._replies_pending = False
                return
            kind, value, body = _messages.receive_message(replies)
            if kind == _messages.REPLY or kind == _messages.FAILED:
                self._handle_reply(kind, value, body)
            elif kind == _messages.READY:
                self._handle_ready(value, _messages.PID.unpack(body)[0])
            else:
                log.error("ignoring a 0MQ message of unknown kind %d", kind)
        self._replies_pending = True

    def _handle_reply(self, kind: int, request_id: int, body: memoryview) -> None:
        conn = self._in_flight.pop(request_id, None)
        if conn is None:
            log.debug("request %d: dropping a reply that nobody waits for", request_id)
            return
        worker = conn.worker
        worker.in_flight.discard(request_id)
        worker.served += 1
        if self._queue:
            self._dispatch_queued()

        if kind == _messages.FAILED:
            self._reset(conn)
            return
        conn.reply = body
        conn.state = WRITING
        self._write(conn)

    def _handle_ready(self, worker_id: int, pid: int) -> None:
        worker = self.forker.workers.get(worker_id)
        if worker is None:
            # READY overtook the fork server's SPAWNED record.
            self._early_ready[worker_id] = pid
            return
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._request_endpoint(worker_id))
        worker.push = push
        worker.ready = True
        self._ready.append(worker)
        self._boot_failures = 0
        log.info("worker %d (pid %d) ready", worker_id, pid)
        if self._queue:
            self._dispatch_queued()

    def _handle_forker_events(self, fd, mask) -> None:
        events = self.forker.receive_events()
        if events is None:
            self._fail(GasparError("the fork server exited unexpectedly; no worker can be replaced"))
            return
        for event in events:
            kind, subject, value = event
            if kind == SPAWNED:
                watch_sentinel = functools.partial(self._handle_sentinel, subject)
                self._selector.register(subject.sentinel, selectors.EVENT_READ, watch_sentinel)
                pid = self._early_ready.pop(subject.worker_id, None)
                if pid is not None:
                    self._handle_ready(subject.worker_id, pid)
            else:
                self._log_forker_event(event)
                if kind == EXITED:
                    self._handle_exit(subject)
                elif kind == FORK_FAILED:
                    self._handle_boot_failure(f"fork() failed: {os.strerror(value)}")

    def _handle_sentinel(self, worker: WorkerProcess, fd, mask) -> None:
        """React to a worker's death at once; its exit status comes later."""
        self._selector.unregister(fd)
        worker.close_sentinel()
        self._retire(worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop using a dead worker and fail exactly the requests it held."""
        if worker in self._ready:
            self._ready.remove(worker)
        if worker.push is not None:
            worker.push.close(linger=0)
            worker.push = None
        failed = 0
        for request_id in list(worker.in_flight):
            conn = self._in_flight.pop(request_id, None)
            if conn is not None:
                self._reset(conn)
                failed += 1
        worker.in_flight.clear()
        if not self._stopping:
            log.warning(
                "worker %d (pid %d) died; failed its %d requests in flight",
                worker.worker_id,
                worker.pid,
                failed,
            )

    def _handle_exit(self, worker: WorkerProcess) -> None:
        """Replace a reaped worker, unless it never became ready."""
        if worker.sentinel >= 0:
            self._selector.unregister(worker.sentinel)
            worker.close_sentinel()
            self._retire(worker)
        if self._stopping:
            return
        if not worker.ready:
            self._handle_boot_failure(
                f"worker {worker.worker_id} (pid {worker.pid}) "
                f"{describe_wait_status(worker.exit_status)} before it was ready"
            )
            return
        self.forker.spawn()

    def _handle_boot_failure(self, reason: str) -> None:
        if not self.running.is_set():
            self._error = StartupError(f"{reason}; see the worker's log above")
            return
        self._boot_failures += 1
        if self._boot_failures > MAX_BOOT_FAILURES:
            self._fail(StartupError(f"{reason}; {MAX_BOOT_FAILURES} replacement workers failed in a row, giving up"))
            return
        delay = BOOT_RETRY_DELAY * 2 ** (self._boot_failures - 1)
        log.error("%s; retrying in %.1f s", reason, delay)
        self._call_later(delay, self.forker.spawn)

    def _fail(self, error: BaseException) -> None:
        log.error("stopping: %s", error)
        self._error = error
        self._begin_stop()
        self._drain_deadline = time.monotonic()

    def _log_forker_event(self, event) -> None:
        kind, subject, value = event
        if kind == EXITED:
            level = logging.INFO if self._stopping and value == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", subject.worker_id, subject.pid, describe_wait_status(value))
        elif kind == FORK_FAILED:
            log.error("fork() of worker %d failed: %s", subject, os.strerror(value))

    # -- worker side ------------------------------------------------------

    def _run_worker(self, worker_id: int) -> int:
        """Run in a new worker process: serve requests until told to stop."""
        loop = WorkerLoop(self.consumer, worker_id, self._request_endpoint(worker_id), self._reply_endpoint())
        return loop.run()

    def _request_endpoint(self, worker_id: int) -> str:
        return f"ipc://{self._runtime_dir}/worker-{worker_id}"

    def _reply_endpoint(self) -> str:
        return f"ipc://{self._runtime_dir}/replies"


def _framing_implementation() -> str:
    from gaspar import framing

    return framing.IMPLEMENTATION


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_seconds(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'at least 0' if allow_zero else 'above 0'} seconds, got {value}")
    return float(value)
