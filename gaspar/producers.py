"""Producer: the TCP front end, and the loop that hands requests to workers.

One thread runs one ``selectors`` loop over the listening socket, every
client connection, the 0MQ socket that carries replies, the fork server's
control socket and each worker's sentinel. gaspar._connection holds the
socket I/O of a connection, gaspar._dispatch the record of which worker
holds which request, and gaspar.workers the worker processes.
"""

from __future__ import annotations

import collections
import errno
import functools
import heapq
import itertools
import logging
import os
import random
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import zmq

from gaspar import _messages
from gaspar._connection import DISPATCHED, LINGER_RESET, QUEUED, READING, WRITING, ClientClosed, Connection
from gaspar._dispatch import Dispatcher
from gaspar._options import resolve_options
from gaspar._rejections import RejectionLog
from gaspar._worker import WorkerLoop
from gaspar.consumers import Consumer, Handler, as_consumer
from gaspar.errors import FrameTooLarge, GasparError, StartupError
from gaspar.workers import EXITED, FORK_FAILED, SPAWNED, Forker, WorkerProcess, describe_wait_status

log = logging.getLogger(__name__)

# Connections accepted per wake-up of the listening socket.
ACCEPT_BATCH = 128
# 0MQ messages handled per wake-up before other sockets get a turn.
REPLY_BATCH = 256
# How long accepting pauses after the process runs out of file descriptors.
ACCEPT_PAUSE = 0.5
# Workers that may fail to become ready in a row, after startup, before the
# producer gives up; the retry delay doubles from BOOT_RETRY_DELAY seconds.
MAX_BOOT_FAILURES = 5
BOOT_RETRY_DELAY = 0.5
# Maximum time the loop sleeps, in seconds, so periodic work (log summaries) still runs.
MAX_POLL_TIMEOUT = 1.0

_LOOP_THREAD_NAME = "gaspar-producer"
_ACCEPT_ERRNOS_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Causes of failed requests, as logged and counted.
TOO_LARGE = "request too large"
READ_TIMEOUT = "read timeout"
HANDLER_ERROR = "handler raised"
WORKER_DIED = "worker died"
TIMEOUT = "handler timeout"
CLIENT_LEFT = "client left"
STOPPING = "server stopping"
SEND_FAILED = "send to worker failed"
# Not a failed request: the connection waits in the listen backlog.
ACCEPT_FAILED = "accept failed"


def format_address(host: str, port: int) -> str:
    """Return "host:port", with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Producer:
    """A TCP daemon that hands each request to one of N worker processes.

    ``consumer`` is a Consumer or a plain handler function; ``processes``
    defaults to os.cpu_count(). The keyword options and their defaults are
    listed in gaspar._options (``gaspar serve --help`` prints them):
    max_request_size, read_timeout, timeout, max_requests,
    max_requests_jitter, max_worker_memory, max_connections, max_in_flight,
    graceful_timeout, startup_timeout, kill_timeout, prefetch and backlog.
    """

    def __init__(
        self,
        consumer: Union[Consumer, Handler],
        port: int,
        processes: Optional[int] = None,
        host: str = "127.0.0.1",
        **options: Any,
    ) -> None:
        self.consumer = as_consumer(consumer)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
        if processes is None:
            processes = os.cpu_count() or 1
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive int, got {processes!r}")
        self.port = port
        self.processes = processes
        self.host = host

        values = resolve_options(options)
        self.max_request_size: int = values["max_request_size"]
        self.read_timeout: float = values["read_timeout"]
        self.write_timeout: float = values["write_timeout"]
        self.timeout: Optional[float] = values["timeout"]
        self.max_requests: Optional[int] = values["max_requests"]
        self.max_requests_jitter: int = values["max_requests_jitter"]
        if self.max_requests_jitter is None:
            self.max_requests_jitter = (self.max_requests or 0) // 10
        self.max_worker_memory: Optional[int] = values["max_worker_memory"]
        self.max_connections: int = values["max_connections"]
        self.max_in_flight: int = values["max_in_flight"] or 4 * processes
        self.graceful_timeout: float = values["graceful_timeout"]
        self.startup_timeout: float = values["startup_timeout"]
        self.prefetch: int = values["prefetch"]
        self.backlog: int = values["backlog"]

        self.forker = Forker(self._run_worker, kill_timeout=values["kill_timeout"])
        self.server_addr: Optional[Tuple[str, int]] = None
        self.running = threading.Event()
        self.stopped = threading.Event()
        self._loop_thread: Optional[threading.Thread] = None
        self._active = False
        self._stop_requested = False
        self._error: Optional[BaseException] = None
        self._counters: collections.Counter = collections.Counter()
        self._rejections = RejectionLog(log)

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
        restore_signals: Callable[[], None] = lambda: None
        try:
            self._setup()
            if blocking:
                # Before the workers start, so a SIGTERM during startup is not fatal.
                restore_signals = self._install_signal_handlers()
            self._start_workers()
        except BaseException:
            restore_signals()
            self._teardown()
            raise

        self._active = True
        self.stopped.clear()
        self.running.set()
        self._update_accepting()
        log.info(
            "listening on %s with %s (framing: %s, max request size: %d bytes, "
            "max in flight: %d, max connections: %d, handler timeout: %s)",
            self.address,
            _count(self.processes, "worker"),
            _framing_implementation(),
            self.max_request_size,
            self.max_in_flight,
            self.max_connections,
            "none" if self.timeout is None else f"{self.timeout} s",
        )

        if not blocking:
            self._loop_thread = threading.Thread(target=self._serve_forever, name=_LOOP_THREAD_NAME, daemon=True)
            self._loop_thread.start()
            return

        self._loop_thread = threading.current_thread()
        try:
            self._serve_forever()
        finally:
            restore_signals()
        if self._error is not None:
            raise self._error

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, let requests in flight finish, then end every worker.

        Requests still unanswered after ``graceful_timeout`` fail. Waits up
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

    def stats(self) -> Dict[str, Any]:
        """Return counters: requests accepted, succeeded, failed by cause, in flight, and per worker."""
        counters = self._counters
        dispatcher = getattr(self, "_dispatcher", None)
        return {
            "accepted": counters["accepted"],
            "succeeded": counters["succeeded"],
            "failed": {cause: count for cause, count in list(self._rejections.totals.items()) if cause != ACCEPT_FAILED},
            "accept_errors": self._rejections.totals[ACCEPT_FAILED],
            "in_flight": len(dispatcher.in_flight) if dispatcher else 0,
            "queued": len(dispatcher.queue) if dispatcher else 0,
            "worker_restarts": counters["worker_restarts"],
            "workers": {worker.pid: worker.served for worker in list(self.forker.workers.values())},
        }

    # -- setup and teardown ---------------------------------------------

    def _setup(self) -> None:
        """Create every resource; _teardown() can undo any prefix of this."""
        self._error = None
        self._stop_requested = False
        self._stopping = False
        self._stop_immediately = False
        self._drain_deadline = 0.0
        self._listener: Optional[socket.socket] = None
        self._accepting = False
        self._accept_blocked_until = 0.0
        self._context: Optional[zmq.Context] = None
        self._replies = None
        self._replies_pending = False
        self._runtime_dir: Optional[str] = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        self._dispatcher = Dispatcher(self.prefetch, self.timeout)
        self._connections: Dict[int, Connection] = {}
        # Requests whose header has been read and that are not answered yet.
        self._counted = 0
        # Connections not read from while the in-flight limit is reached.
        self._held: Deque[Connection] = collections.deque()
        # Connections still reading, in accept order, for the read timeout.
        self._reading: Deque[Connection] = collections.deque()
        # Connections waiting for the client to take the rest of its reply.
        self._writing: set = set()
        self._next_write_check = 0.0
        self._early_ready: Dict[int, int] = {}
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._boot_failures = 0

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
            # Accepted sockets inherit this: see LINGER_RESET.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            return listener

        raise StartupError(
            f"cannot listen on {format_address(self.host, self.port)}: {errors[0].strerror}; "
            "choose another port or stop the process that holds it"
        ) from errors[0]

    def _start_workers(self) -> None:
        for _ in range(self.processes):
            self.forker.spawn()

        deadline = time.monotonic() + self.startup_timeout
        while len(self._dispatcher.ready) < self.processes:
            if self._error is not None:
                raise self._error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartupError(
                    f"only {len(self._dispatcher.ready)} of {self.processes} workers were ready after "
                    f"{self.startup_timeout} s; raise startup_timeout if setup() is slow"
                )
            self._poll(min(remaining, MAX_POLL_TIMEOUT))

    def _teardown(self) -> None:
        for conn in list(self._connections.values()):
            self._fail_request(conn, STOPPING, "the producer stopped")
        workers = list(self.forker.workers.values())
        for worker in workers:
            self._stop_worker(worker)
        # The Forker closes the sentinels, so the selector goes first.
        self._selector.close()

        # The reply socket stays open meanwhile, so workers can flush on exit.
        kill_timeout = 0.0 if self._stop_immediately else None
        for event in self.forker.close(kill_timeout):
            self._log_forker_event(event)
        for worker in workers:
            if worker.push is not None:
                worker.push.close(linger=0)
                worker.push = None

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
        self._rejections.flush(time.monotonic(), force=True)

    def _install_signal_handlers(self) -> Callable[[], None]:
        """Route SIGINT, SIGTERM and SIGHUP to the loop; return a function that undoes it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
            while not self._stopping or (self._connections and time.monotonic() < self._drain_deadline):
                self._poll(self._next_timeout())
        except BaseException as exc:
            log.exception("producer loop failed; stopping")
            self._error = exc
        finally:
            self._finish_stop()

    def _poll(self, timeout: float) -> None:
        if self._replies_pending:
            timeout = 0
        for key, mask in self._selector.select(timeout):
            key.data(key.fileobj, mask)
        if self._replies_pending:
            self._drain_replies(None, 0)

        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()
        self._expire_reads(now)
        self._expire_writes(now)
        self._expire_requests(now)
        self._rejections.flush(now)

    def _next_timeout(self) -> float:
        deadlines = [MAX_POLL_TIMEOUT + time.monotonic()]
        if self._timers:
            deadlines.append(self._timers[0][0])
        if self._reading:
            deadlines.append(self._reading[0].read_deadline)
        if self._writing:
            deadlines.append(self._next_write_check)
        request_deadline = self._dispatcher.next_deadline()
        if request_deadline is not None:
            deadlines.append(request_deadline)
        if self._stopping:
            deadlines.append(self._drain_deadline)
        return max(min(deadlines) - time.monotonic(), 0.0)

    def _call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), callback))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
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
                name = signal.Signals(value).name
                if self._stopping:
                    log.warning("second %s received: stopping now", name)
                    self._stop_now()
                else:
                    log.info("%s received: stopping gracefully", name)
                    self._begin_stop()
            elif value == signal.SIGHUP:
                self._restart_workers("SIGHUP received")

    def _restart_workers(self, reason: str) -> None:
        """Replace every worker without failing a request, as with max_requests."""
        workers = list(self._dispatcher.ready)
        log.info("%s: replacing all %d workers", reason, len(workers))
        for worker in workers:
            self._recycle(worker, reason)

    # -- stopping -----------------------------------------------------------

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_immediately = False
        self._drain_deadline = time.monotonic() + self.graceful_timeout
        self._update_accepting()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in list(self._connections.values()):
            if conn.state == READING:
                self._fail_request(conn, STOPPING, "the producer is stopping")
        log.info(
            "stopping: %d requests in flight, %d queued, waiting up to %s s",
            len(self._dispatcher.in_flight),
            len(self._dispatcher.queue),
            self.graceful_timeout,
        )

    def _stop_now(self) -> None:
        """End the drain: fail what is left and kill the workers without waiting."""
        self._begin_stop()
        self._stop_immediately = True
        self._drain_deadline = time.monotonic()

    def _finish_stop(self) -> None:
        left = len(self._connections)
        if left:
            reason = "at an immediate stop" if self._stop_immediately else "after the graceful timeout"
            log.warning("failing %s still unanswered %s", _count(left, "request"), reason)
            # Their replies would be dropped, so workers need not finish them.
            self._stop_immediately = True
        self._teardown()
        self._active = False
        self.running.clear()
        self.stopped.set()
        log.info("stopped")

    # -- connections ------------------------------------------------------

    def _update_accepting(self) -> None:
        """Watch the listener exactly when a new connection may be taken."""
        want = (
            self._listener is not None
            and not self._stopping
            and self._active
            and len(self._connections) < self.max_connections
            and self._counted < self.max_in_flight
            and time.monotonic() >= self._accept_blocked_until
        )
        if want == self._accepting:
            return
        if want:
            self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        else:
            self._selector.unregister(self._listener)
        self._accepting = want

    def _accept(self, listener, mask) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._accepting:
                return
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRNOS_OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            conn = Connection(sock)
            self._connections[conn.fd] = conn
            self._counters["accepted"] += 1
            self._read(conn)
            if conn.state == READING and self._connections.get(conn.fd) is conn:
                conn.read_deadline = time.monotonic() + self.read_timeout
                self._reading.append(conn)
                self._watch(conn, selectors.EVENT_READ)
            if len(self._connections) >= self.max_connections:
                self._update_accepting()

    def _pause_accepting(self, exc: OSError) -> None:
        """Stop accepting for a while: the process is out of descriptors or memory."""
        self._rejections.record(
            ACCEPT_FAILED, f"{exc.strerror}; pausing accept for {ACCEPT_PAUSE} s", time.monotonic()
        )
        self._accept_blocked_until = time.monotonic() + ACCEPT_PAUSE
        self._update_accepting()
        self._call_later(ACCEPT_PAUSE, self._update_accepting)

    def _watch(self, conn: Connection, events: int) -> None:
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
            if not conn.counted and self._counted >= self.max_in_flight:
                # Backpressure: no new request is read until one is answered.
                self._watch(conn, 0)
                conn.held = True
                self._held.append(conn)
                return
            self._read(conn)
        elif conn.state == WRITING:
            self._write(conn)

    def _read(self, conn: Connection) -> None:
        """Read from the client; hand the request to the dispatcher once complete."""
        try:
            payload = conn.read_request(self.max_request_size)
        except BlockingIOError:
            payload = None
        except FrameTooLarge as exc:
            self._fail_request(conn, TOO_LARGE, str(exc))
            return
        except ClientClosed as exc:
            if exc.mid_frame:
                self._fail_request(conn, CLIENT_LEFT, str(exc))
            else:
                self._finish(conn, clean=True)
            return
        except OSError as exc:
            self._fail_request(conn, CLIENT_LEFT, exc.strerror or str(exc))
            return

        if not conn.counted and (payload is not None or conn.header_known):
            conn.counted = True
            self._counted += 1
            if self._counted >= self.max_in_flight:
                self._update_accepting()
        if payload is not None:
            self._submit(conn, payload)

    def _submit(self, conn: Connection, payload) -> None:
        self._watch(conn, 0)
        if len(payload) == 0:
            # A zero-length request is closed without a reply.
            self._finish(conn, clean=True)
            return
        try:
            self._dispatcher.submit(conn, payload, time.monotonic())
        except zmq.ZMQError as exc:
            self._fail_request(conn, SEND_FAILED, str(exc))

    def _write(self, conn: Connection) -> None:
        before = len(conn.reply)
        try:
            remaining = conn.send_reply()
        except OSError as exc:
            self._fail_request(conn, CLIENT_LEFT, f"{exc.strerror or exc}; reply dropped")
            return
        if remaining == 0:
            self._counters["succeeded"] += 1
            self._finish(conn, clean=True)
            return
        if remaining < before or conn.events != selectors.EVENT_WRITE:
            conn.write_deadline = time.monotonic() + self.write_timeout
        self._writing.add(conn)
        self._watch(conn, selectors.EVENT_WRITE)

    def _fail_request(self, conn: Connection, cause: str, detail: str) -> None:
        """Reset a connection and count the failure under its cause."""
        self._rejections.record(cause, detail, time.monotonic())
        self._finish(conn, clean=False)

    def _finish(self, conn: Connection, clean: bool) -> None:
        """Close a connection (a FIN when clean, else a reset) and release what it held."""
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        if conn.state == DISPATCHED or conn.state == QUEUED:
            self._dispatcher.discard(conn)
        elif conn.state == WRITING:
            self._writing.discard(conn)
        self._connections.pop(conn.fd, None)
        if clean:
            conn.close()
        else:
            conn.reset()

        if conn.counted:
            conn.counted = False
            self._counted -= 1
            if self._held:
                self._release_held()
        if not self._accepting:
            self._update_accepting()

    def _release_held(self) -> None:
        """Read held connections again once the in-flight count is below its limit."""
        while self._held and self._counted < self.max_in_flight:
            conn = self._held.popleft()
            if conn.state == READING:
                # The read timeout starts again: the wait was the server's doing.
                conn.held = False
                conn.read_deadline = time.monotonic() + self.read_timeout
                self._reading.append(conn)
                self._watch(conn, selectors.EVENT_READ)

    def _expire_reads(self, now: float) -> None:
        reading = self._reading
        while reading and reading[0].read_deadline <= now:
            conn = reading.popleft()
            # A held connection is appended again, with a new deadline, on release.
            if conn.state == READING and not conn.held and self._connections.get(conn.fd) is conn:
                self._fail_request(conn, READ_TIMEOUT, f"no complete request within {self.read_timeout} s")

    def _expire_writes(self, now: float) -> None:
        """Reset connections whose client took no reply bytes within the write timeout."""
        if not self._writing or now < self._next_write_check:
            return
        # Progress moves a deadline, so deadlines are unordered: scan, but at
        # most four times a second. The set is bounded by the in-flight limit.
        self._next_write_check = now + 0.25
        for conn in [conn for conn in self._writing if conn.write_deadline <= now]:
            self._fail_request(conn, CLIENT_LEFT, f"the client read none of its reply for {self.write_timeout} s")

    def _expire_requests(self, now: float) -> None:
        """Kill the worker of each request that ran past the handler timeout."""
        for worker, request_id in self._dispatcher.expired(now):
            if worker.timed_out:
                continue
            worker.timed_out = True
            log.error(
                "request %d ran past the %s s timeout on worker %d (pid %d); killing the worker",
                request_id,
                self.timeout,
                worker.worker_id,
                worker.pid,
            )
            self.forker.kill(worker, signal.SIGKILL)
            for conn in self._dispatcher.remove_worker(worker):
                cause = TIMEOUT if conn.request_id == request_id else WORKER_DIED
                self._fail_request(conn, cause, f"worker {worker.worker_id} (pid {worker.pid}) was killed")

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
            if kind == _messages.READY:
                self._handle_ready(value, _messages.PID.unpack(body)[0])
            elif kind == _messages.STOPPING:
                self._handle_worker_stopping(value)
            else:
                self._handle_reply(kind, value, body)
        self._replies_pending = True

    def _handle_reply(self, kind: int, request_id: int, body: memoryview) -> None:
        dispatcher = self._dispatcher
        conn = dispatcher.complete(request_id)
        if conn is None:
            log.debug("request %d: dropping the reply because its connection is already closed", request_id)
            return

        worker = conn.worker
        if kind & _messages.RECYCLE_FLAG:
            self._recycle(worker, f"is above the memory limit of {self.max_worker_memory} MiB")
        elif worker.max_served is not None and worker.served >= worker.max_served:
            self._recycle(worker, f"served {worker.served} requests")
        if dispatcher.queue:
            for failed, exc in dispatcher.send_queued(time.monotonic()):
                self._fail_request(failed, SEND_FAILED, str(exc))

        if kind & ~_messages.RECYCLE_FLAG == _messages.FAILED:
            self._fail_request(conn, HANDLER_ERROR, f"request {request_id} on worker {worker.worker_id}")
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
        self._connect_worker(worker)
        worker.ready = True
        if self.max_requests is not None:
            worker.max_served = self.max_requests + random.randint(0, self.max_requests_jitter)
        self._boot_failures = 0
        log.info("worker %d (pid %d) ready", worker_id, pid)

        dispatcher = self._dispatcher
        dispatcher.add_worker(worker)
        # A ready replacement lets the oldest retiring worker stop taking work.
        for old in dispatcher.ready:
            if old.retiring:
                dispatcher.pause_worker(old)
                self._stop_worker(old)
                break
        if dispatcher.queue:
            for failed, exc in dispatcher.send_queued(time.monotonic()):
                self._fail_request(failed, SEND_FAILED, str(exc))

    def _recycle(self, worker: WorkerProcess, reason: str) -> None:
        """Fork a replacement now; the worker stops taking work once the replacement is ready."""
        if worker.retiring or self._stopping:
            return
        worker.retiring = True
        log.info("worker %d (pid %d) %s; replacing it", worker.worker_id, worker.pid, reason)
        self._counters["worker_restarts"] += 1
        self.forker.spawn()

    def _connect_worker(self, worker: WorkerProcess) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        # Long enough to deliver a STOP at teardown; 0MQ queues a message sent
        # before the worker binds, so this also reaches a worker still booting.
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._request_endpoint(worker.worker_id))
        worker.push = push

    def _stop_worker(self, worker: WorkerProcess) -> None:
        """Send STOP: the worker exits after the requests already sent to it."""
        if worker.stop_sent or worker.sentinel < 0:
            return
        worker.stop_sent = True
        if worker.push is None:
            self._connect_worker(worker)
        try:
            _messages.send_message(worker.push, _messages.STOP, 0)
        except zmq.ZMQError as exc:
            log.warning("worker %d (pid %d): sending STOP failed: %s", worker.worker_id, worker.pid, exc)

    def _handle_worker_stopping(self, worker_id: int) -> None:
        """Replace a worker that received SIGTERM, and let it finish what it holds.

        While the producer itself is stopping, the worker keeps serving until
        the drain ends: systemd sends SIGTERM to every process of the service.
        """
        worker = self.forker.workers.get(worker_id)
        if worker is None or worker.stop_sent or self._stopping:
            return
        self._recycle(worker, "received SIGTERM")
        self._dispatcher.pause_worker(worker)
        self._stop_worker(worker)

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
        self._retire(worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop using a dead worker and fail exactly the requests it held."""
        if worker.sentinel < 0:
            return
        self._selector.unregister(worker.sentinel)
        worker.close_sentinel()
        if worker.push is not None:
            worker.push.close(linger=0)
            worker.push = None
        lost = self._dispatcher.remove_worker(worker)
        for conn in lost:
            self._fail_request(conn, WORKER_DIED, f"worker {worker.worker_id} (pid {worker.pid}) died")
        if lost or not (self._stopping or worker.stop_sent or worker.timed_out or not worker.ready):
            log.warning(
                "worker %d (pid %d) died; %s failed with it",
                worker.worker_id,
                worker.pid,
                _count(len(lost), "request it held", "requests it held"),
            )

    def _handle_exit(self, worker: WorkerProcess) -> None:
        """Replace a reaped worker, unless it was retiring or never became ready."""
        self._retire(worker)
        if self._stopping or worker.retiring:
            return
        if not worker.ready:
            self._handle_boot_failure(
                f"worker {worker.worker_id} (pid {worker.pid}) "
                f"{describe_wait_status(worker.exit_status)} before it was ready"
            )
            return
        self._counters["worker_restarts"] += 1
        self.forker.spawn()

    def _handle_boot_failure(self, reason: str) -> None:
        """Retry with a growing delay; give up after MAX_BOOT_FAILURES in a row."""
        if not self.running.is_set():
            self._error = StartupError(f"{reason}; see the worker's log above")
            return
        self._boot_failures += 1
        if self._boot_failures >= MAX_BOOT_FAILURES:
            self._fail(
                StartupError(f"{reason}; {MAX_BOOT_FAILURES} workers in a row failed to start, giving up")
            )
            return
        delay = BOOT_RETRY_DELAY * 2 ** (self._boot_failures - 1)
        log.error("%s; retrying in %.1f s", reason, delay)
        self._call_later(delay, self.forker.spawn)

    def _fail(self, error: BaseException) -> None:
        log.error("stopping: %s", error)
        self._error = error
        self._stop_now()

    def _log_forker_event(self, event) -> None:
        kind, subject, value = event
        if kind == EXITED:
            expected = self._stopping or subject.stop_sent
            level = logging.INFO if expected and value == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", subject.worker_id, subject.pid, describe_wait_status(value))
        elif kind == FORK_FAILED:
            log.error("fork() of worker %d failed: %s", subject, os.strerror(value))

    # -- worker side ------------------------------------------------------

    def _run_worker(self, worker_id: int) -> int:
        """Serve requests in a new worker process until SIGTERM; return its exit code."""
        max_memory = None if self.max_worker_memory is None else self.max_worker_memory * 1024 * 1024
        loop = WorkerLoop(
            self.consumer,
            worker_id,
            self._request_endpoint(worker_id),
            self._reply_endpoint(),
            max_memory=max_memory,
        )
        return loop.run()

    def _request_endpoint(self, worker_id: int) -> str:
        return f"ipc://{self._runtime_dir}/worker-{worker_id}"

    def _reply_endpoint(self) -> str:
        return f"ipc://{self._runtime_dir}/replies"


def _count(number: int, singular: str, plural: Optional[str] = None) -> str:
    """Return "1 worker" or "3 workers"."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _framing_implementation() -> str:
    from gaspar import framing

    return framing.IMPLEMENTATION
