"""Producer: the TCP front end, and the loop that hands requests to workers.

One thread runs one ``selectors`` loop over the listening socket, every
client connection, the 0MQ socket that carries replies, the fork server's
control socket and each worker's sentinel. This module reads requests and
writes replies. The rest of the daemon lives beside it:

- gaspar._connection: the socket I/O of one connection;
- gaspar._dispatch: which worker has which request;
- gaspar._supervisor: keeping the workers running;
- gaspar._loop: the selector, timers and signal wake-ups.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Set, Tuple, Union, cast

import zmq

from gaspar import _messages
from gaspar._connection import (
    DISPATCHED,
    LINGER_RESET,
    QUEUED,
    READING,
    WRITING,
    ClientClosed,
    Connection,
    Payload,
)
from gaspar._dispatch import Dispatcher
from gaspar._loop import EventLoop
from gaspar._options import resolve_options
from gaspar._rejections import (
    ACCEPT_FAILED,
    CLIENT_LEFT,
    HANDLER_ERROR,
    READ_TIMEOUT,
    SEND_FAILED,
    STOPPING,
    TOO_LARGE,
    RejectionLog,
)
from gaspar._supervisor import Supervisor, count_text
from gaspar.consumers import Consumer, Handler, as_consumer
from gaspar.errors import FrameTooLarge, StartupError
from gaspar.metrics import Histogram, MetricsServer, render_prometheus
from gaspar.workers import Forker

log = logging.getLogger(__name__)

# Connections accepted per wake-up of the listening socket.
ACCEPT_BATCH = 128
# 0MQ messages handled per wake-up before other sockets get a turn.
REPLY_BATCH = 256
# How long accepting pauses after the process runs out of file descriptors.
ACCEPT_PAUSE = 0.5
# Maximum time the loop sleeps, in seconds, so periodic work (log summaries) still runs.
MAX_POLL_TIMEOUT = 1.0

# Seconds the loop polls without sleeping before it blocks, while requests
# are in flight and none waits for a worker. A reply that arrives meanwhile
# skips a thread wake-up: about 40 µs of each 0MQ round trip on a 2-core VM.
# When a request waits for a worker, the CPUs are busy, so the loop sleeps.
BUSY_POLL = 50e-6

_LOOP_THREAD_NAME = "gaspar-producer"
_ACCEPT_ERRNOS_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def format_address(host: str, port: int) -> str:
    """Return "host:port", with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Producer:
    """A TCP daemon that hands each request to one of N worker processes.

    ``consumer`` is a Consumer or a plain handler function; ``processes``
    defaults to os.cpu_count(). The keyword options, with their units and
    defaults, are defined in gaspar._options and printed by
    ``gaspar serve --help``: max_request_size, read_timeout, write_timeout,
    timeout, max_requests, max_requests_jitter, max_worker_memory,
    max_connections, max_in_flight, graceful_timeout, startup_timeout,
    kill_timeout, prefetch, backlog, metrics_port and metrics_host.

    Used as a context manager, the producer starts without blocking and
    stops when the block ends.
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
        # Unless set, the in-flight limit follows the worker count, also
        # when SIGTTIN or SIGTTOU changes it.
        self._in_flight_per_worker = 4 if values["max_in_flight"] is None else None
        self.max_in_flight: int = values["max_in_flight"] or 4 * processes
        self.graceful_timeout: float = values["graceful_timeout"]
        self.startup_timeout: float = values["startup_timeout"]
        self.prefetch: int = values["prefetch"]
        self.backlog: int = values["backlog"]
        self.metrics_port: Optional[int] = values["metrics_port"]
        self.metrics_host: str = values["metrics_host"]

        self.forker = Forker(self._run_worker, kill_timeout=values["kill_timeout"])
        self.server_addr: Optional[Tuple[str, int]] = None
        self.running = threading.Event()
        self.stopped = threading.Event()
        self._loop_thread: Optional[threading.Thread] = None
        self._active = False
        self._stop_requested = False
        self._error: Optional[BaseException] = None
        self._counters: collections.Counter[str] = collections.Counter()
        self._rejections = RejectionLog(log)
        self._latency = Histogram()
        self._metrics: Optional[MetricsServer] = None

    # -- public API -------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound address as "host:port", for gaspar.client.request()."""
        if self.server_addr is None:
            raise RuntimeError("the producer is not listening; call start() first")
        return format_address(*self.server_addr)

    @property
    def metrics_addr(self) -> Optional[Tuple[str, int]]:
        """The metrics endpoint's bound (host, port), or None when it is off or stopped."""
        if self._metrics is None or self._metrics.listener is None:
            return None
        return self._metrics.address

    def __enter__(self) -> "Producer":
        """Start without blocking; the with block runs while the producer serves."""
        self.start(blocking=False)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def metrics_text(self) -> str:
        """Return stats() and the latency histogram in the Prometheus text format."""
        return render_prometheus(self.stats(), self._latency)

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
                restore_signals = self._loop.install_signal_handlers(
                    (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
                )
            self._start_workers()
        except BaseException:
            restore_signals()
            self._teardown()
            raise

        self._active = True
        self._supervisor.started = True
        self.stopped.clear()
        self.running.set()
        self._update_accepting()
        log.info(
            "listening on %s with %s (framing: %s, max request size: %d bytes, "
            "max in flight: %d, max connections: %d, handler timeout: %s)",
            self.address,
            count_text(self.processes, "worker"),
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
        self._loop.wake()
        thread = self._loop_thread
        if thread is threading.current_thread():
            return
        self.stopped.wait(timeout)
        if thread is not None and thread.name == _LOOP_THREAD_NAME:
            thread.join(timeout)

    def stats(self) -> Dict[str, Any]:
        """Return counters and the latency histogram.

        Keys: accepted, succeeded, failed (cause -> count), accept_errors,
        in_flight, queued, worker_restarts, workers (pid -> requests served)
        and latency, from accept to the last reply byte: buckets as
        (upper bound in seconds, cumulative count) ending with "+Inf", sum in
        seconds, and count.
        """
        counters = self._counters
        # _setup() creates both, and stats() may run before start().
        dispatcher: Optional[Dispatcher] = getattr(self, "_dispatcher", None)
        supervisor: Optional[Supervisor] = getattr(self, "_supervisor", None)
        return {
            "accepted": counters["accepted"],
            "succeeded": counters["succeeded"],
            "failed": {cause: count for cause, count in list(self._rejections.totals.items()) if cause != ACCEPT_FAILED},
            "accept_errors": self._rejections.totals[ACCEPT_FAILED],
            "in_flight": len(dispatcher.in_flight) if dispatcher else 0,
            "queued": len(dispatcher.queue) if dispatcher else 0,
            "worker_restarts": supervisor.restarts if supervisor else 0,
            "workers": {worker.pid: worker.served for worker in list(self.forker.workers.values())},
            "latency": {
                "buckets": self._latency.cumulative(),
                "sum": self._latency.sum,
                "count": self._latency.count,
            },
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
        self._context: Optional[zmq.Context[zmq.Socket[bytes]]] = None
        self._replies: Optional[zmq.Socket[bytes]] = None
        self._replies_pending = False
        self._runtime_dir: Optional[str] = None
        self._metrics = None
        self._loop = EventLoop(on_wake=self._handle_stop_request, on_signal=self._handle_signal)

        self._dispatcher = Dispatcher(self.prefetch, self.timeout)
        # When to look again for queued requests to move to an idle worker.
        self._steal_at: Optional[float] = None
        self._connections: Dict[int, Connection] = {}
        # Requests whose header has been read and that are not answered yet.
        self._counted = 0
        # Connections not read from while the in-flight limit is reached.
        self._held: Deque[Connection] = collections.deque()
        # Connections still reading, in accept order, for the read timeout.
        self._reading: Deque[Connection] = collections.deque()
        # Connections waiting for the client to take the rest of its reply.
        self._writing: Set[Connection] = set()
        self._next_write_check = 0.0

        self._runtime_dir = tempfile.mkdtemp(prefix="gaspar-")
        self._supervisor = Supervisor(
            self.consumer,
            self.forker,
            self._dispatcher,
            self._loop,
            self._runtime_dir,
            max_requests=self.max_requests,
            max_requests_jitter=self.max_requests_jitter,
            max_worker_memory=self.max_worker_memory,
            timeout=self.timeout,
            fail_request=self._fail_request,
            send_queued=self._send_queued,
            deliver_reply=self._deliver_kept_reply,
            fail=self._fail,
        )
        # Fork the fork server first: this process runs no thread of ours yet,
        # and holds no listening socket or 0MQ context for workers to inherit.
        self.forker.start()
        self._loop.register(self.forker.fileno(), selectors.EVENT_READ, self._supervisor.handle_forker_events)

        self._listener = self._listen()
        self.server_addr = self._listener.getsockname()[:2]
        if self.metrics_port is not None:
            self._start_metrics(self.metrics_port)

        self._context = zmq.Context(io_threads=1)
        self._supervisor.context = self._context
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.RCVHWM, 0)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(self._supervisor.reply_endpoint())
        self._loop.register(self._replies.getsockopt(zmq.FD), selectors.EVENT_READ, self._drain_replies)

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

    def _start_metrics(self, port: int) -> None:
        self._metrics = MetricsServer(
            self._loop,
            self.metrics_host,
            port,
            render=self.metrics_text,
            healthy=lambda: self._active and not self._stopping,
        )
        try:
            self._metrics.start()
        except OSError as exc:
            self._metrics = None
            raise StartupError(
                f"cannot listen for metrics on {format_address(self.metrics_host, port)}: "
                f"{exc.strerror}; choose another metrics port"
            ) from exc
        log.info("serving metrics at http://%s/metrics", format_address(*self._metrics.address))

    def _start_workers(self) -> None:
        self._supervisor.spawn(self.processes)

        deadline = time.monotonic() + self.startup_timeout
        while len(self._dispatcher.ready) < self.processes:
            if self._supervisor.startup_error is not None:
                raise self._supervisor.startup_error
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
        # None when _setup() failed before creating it, on the first start().
        supervisor: Optional[Supervisor] = getattr(self, "_supervisor", None)
        if supervisor is not None:
            # The reply socket stays open meanwhile, so workers can flush on exit.
            supervisor.stop_all(kill_now=self._stop_immediately)
        if self._metrics is not None:
            self._metrics.close()
        # EventLoop() itself may have failed, for lack of descriptors.
        loop: Optional[EventLoop] = getattr(self, "_loop", None)
        if loop is not None:
            loop.close()

        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._replies is not None:
            self._replies.close(linger=0)
            self._replies = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        self._rejections.flush(time.monotonic(), force=True)

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
        dispatcher = self._dispatcher
        busy_poll = BUSY_POLL if dispatcher.in_flight and not dispatcher.queue else 0.0
        self._loop.run_once(timeout, busy_poll)
        if self._replies_pending:
            self._drain_replies(None, 0)
        self._steal_at = None
        if dispatcher.prefetch > 1 and not dispatcher.queue and dispatcher.in_flight:
            if dispatcher.steal(self.forker.workers.values()):
                # A worker held its lock: try again on the next round, without sleeping.
                self._steal_at = time.monotonic()
            if dispatcher.queue:
                self._send_queued()

        now = time.monotonic()
        self._expire_reads(now)
        self._expire_writes(now)
        self._supervisor.expire_requests(now)
        self._rejections.flush(now)

    def _next_timeout(self) -> float:
        deadlines = [MAX_POLL_TIMEOUT + time.monotonic()]
        timer = self._loop.next_timer()
        if timer is not None:
            deadlines.append(timer)
        if self._reading:
            deadlines.append(self._reading[0].read_deadline)
        if self._writing:
            deadlines.append(self._next_write_check)
        request_deadline = self._dispatcher.next_deadline()
        if request_deadline is not None:
            deadlines.append(request_deadline)
        if self._steal_at is not None:
            deadlines.append(self._steal_at)
        if self._stopping:
            deadlines.append(self._drain_deadline)
        return max(min(deadlines) - time.monotonic(), 0.0)

    def _handle_stop_request(self) -> None:
        if self._stop_requested:
            self._begin_stop()

    def _set_processes(self, processes: int) -> None:
        self.processes = processes
        if self._in_flight_per_worker is not None:
            self.max_in_flight = self._in_flight_per_worker * processes
            self._update_accepting()
            if self._held:
                self._release_held()

    def _handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping and signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            log.info("%s received while stopping: ignored", name)
        elif signum == signal.SIGHUP:
            self._supervisor.restart_all(f"{name} received")
        elif signum == signal.SIGTTIN:
            self._set_processes(self.processes + 1)
            log.info("%s received: adding a worker, now %d", name, self.processes)
            self._supervisor.spawn(1)
        elif signum == signal.SIGTTOU:
            if self.processes > 1:
                self._supervisor.retire_one()
                self._set_processes(self.processes - 1)
                log.info("%s received: retiring a worker, now %d", name, self.processes)
            else:
                log.warning("%s received: keeping the last worker", name)
        elif self._stopping:
            log.warning("second %s received: stopping now", name)
            self._stop_now()
        else:
            log.info("%s received: stopping gracefully", name)
            self._begin_stop()

    # -- stopping -----------------------------------------------------------

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._supervisor.stopping = True
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
            "stopping: %s in flight, %d queued, waiting up to %s s",
            count_text(len(self._dispatcher.in_flight), "request"),
            len(self._dispatcher.queue),
            self.graceful_timeout,
        )

    def _fail(self, error: BaseException) -> None:
        """Stop the producer for good because of ``error``, which start() raises when blocking."""
        log.error("stopping: %s", error)
        self._error = error
        self._stop_now()

    def _stop_now(self) -> None:
        """End the drain: fail what is left and kill the workers without waiting."""
        self._begin_stop()
        self._stop_immediately = True
        self._drain_deadline = time.monotonic()

    def _finish_stop(self) -> None:
        left = len(self._connections)
        if left:
            reason = "at an immediate stop" if self._stop_immediately else "after the graceful timeout"
            log.warning("failing %s still unanswered %s", count_text(left, "request"), reason)
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
            self._loop.register(self._listener, selectors.EVENT_READ, self._accept)
        else:
            self._loop.unregister(self._listener)
        self._accepting = want

    def _accept(self, listener: socket.socket, mask: int) -> None:
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
            if sock.gettimeout() is not None:
                # socket.setdefaulttimeout() gave it a timeout, under which a
                # MSG_DONTWAIT call would still wait for readiness.
                sock.setblocking(False)
            conn = Connection(sock, time.monotonic())
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
        self._loop.call_later(ACCEPT_PAUSE, self._update_accepting)

    def _watch(self, conn: Connection, events: int) -> None:
        if conn.events == events:
            return
        if conn.events == 0:
            self._loop.register(conn.sock, events, self._handle_connection)
        elif events == 0:
            self._loop.unregister(conn.sock)
        else:
            self._loop.modify(conn.sock, events, self._handle_connection)
        conn.events = events

    def _handle_connection(self, sock: socket.socket, mask: int) -> None:
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

    def _submit(self, conn: Connection, payload: Payload) -> None:
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
        reply = conn.reply
        if reply is None:
            raise RuntimeError(f"connection {conn.fd} is WRITING without a reply")
        before = len(reply)
        try:
            remaining = conn.send_reply()
        except OSError as exc:
            self._fail_request(conn, CLIENT_LEFT, f"{exc.strerror or exc}; reply dropped")
            return
        if remaining == 0:
            self._counters["succeeded"] += 1
            self._latency.observe(time.monotonic() - conn.accepted_at)
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
            self._loop.unregister(conn.sock)
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

    # -- replies and workers ------------------------------------------------

    def _drain_replies(self, fd: Optional[int], mask: int) -> None:
        """Handle every waiting 0MQ message, or REPLY_BATCH of them.

        The 0MQ descriptor is edge-triggered: it signals only when the socket's
        state changes, so the socket must be read until EVENTS shows no input,
        or the loop would never hear of the messages left behind.
        """
        replies = self._replies
        if replies is None:
            raise RuntimeError("the producer's reply socket is closed; replies are read only while it runs")
        for _ in range(REPLY_BATCH):
            # pyzmq types getsockopt() as int | bytes for every option, and EVENTS is an int.
            events = cast(int, replies.getsockopt(zmq.EVENTS))
            if not events & zmq.POLLIN:
                self._replies_pending = False
                return
            kind, value, body = _messages.receive_message(replies)
            if kind == _messages.READY:
                self._supervisor.handle_ready(value, _messages.PID.unpack(body)[0])
                self._send_queued()
            elif kind == _messages.STOPPING:
                self._supervisor.handle_stopping(value)
            else:
                self._handle_reply(kind, value, body)
        self._replies_pending = True

    def _send_queued(self) -> None:
        for failed, exc in self._dispatcher.send_queued(time.monotonic()):
            self._fail_request(failed, SEND_FAILED, str(exc))

    def _handle_reply(self, kind: int, request_id: int, body: memoryview) -> None:
        dispatcher = self._dispatcher
        completed = dispatcher.complete(request_id, time.monotonic())
        if completed is None:
            log.debug("request %d: dropping the reply because its connection is already closed", request_id)
            return

        conn, worker = completed
        self._supervisor.after_reply(worker, over_memory=bool(kind & _messages.RECYCLE_FLAG))
        if dispatcher.queue:
            self._send_queued()

        if kind & ~_messages.RECYCLE_FLAG == _messages.FAILED:
            self._fail_request(conn, HANDLER_ERROR, f"request {request_id} on worker {worker.worker_id}")
            return
        conn.reply = body
        conn.state = WRITING
        self._write(conn)

    def _deliver_kept_reply(self, request_id: int, body: memoryview) -> None:
        """Write a reply that a dead worker's claim record kept, as if the worker had sent it."""
        completed = self._dispatcher.complete(request_id, time.monotonic())
        if completed is None:
            return
        conn, _ = completed
        conn.reply = body
        conn.state = WRITING
        self._write(conn)

    def _run_worker(self, worker_id: int, reload: bool) -> int:
        """Serve requests in a new worker process; runs after the fork."""
        return self._supervisor.run_worker(worker_id, reload)


def _framing_implementation() -> str:
    from gaspar import framing

    return framing.IMPLEMENTATION
