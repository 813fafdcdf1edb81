"""Request metrics: a latency histogram, the Prometheus text format, and a tiny HTTP endpoint.

The endpoint runs on the producer's own selectors loop, so it needs no
thread and reads the counters without locks. It answers ``GET /metrics``
with the Prometheus text exposition format (version 0.0.4) and
``GET /healthz`` with ``200 OK`` while the producer runs.
"""

from __future__ import annotations

import bisect
import functools
import logging
import selectors
import socket
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:
    from gaspar._loop import EventLoop

log = logging.getLogger(__name__)

# Upper bounds of the latency buckets, in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# An HTTP request head larger than this is answered with 431 and closed.
MAX_REQUEST_HEAD = 8192
# Metrics connections open at once; more wait in the listen backlog.
MAX_METRICS_CLIENTS = 64
# Seconds accepting pauses after accept() fails, as when out of descriptors.
ACCEPT_PAUSE = 0.5
# Seconds a metrics client has to send its request and read the response.
METRICS_CLIENT_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts of observed values per bucket, with their sum, as Prometheus histograms keep them."""

    def __init__(self, buckets: Tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        # One count per bucket, plus the last for values above every bound.
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> List[Tuple[str, int]]:
        """Return (upper bound as text, count of values at or below it), ending with +Inf."""
        total = 0
        result = []
        for bound, count in zip(self.buckets, self.counts):
            total += count
            result.append((_format_number(bound), total))
        result.append(("+Inf", self.count))
        return result


def _format_number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_prometheus(stats: Dict[str, Any], latency: Histogram) -> str:
    """Return Producer.stats() and the latency histogram in the Prometheus text format."""
    lines: List[str] = []

    def metric(name: str, kind: str, help_text: str, samples: List[Tuple[str, Any]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("gaspar_requests_accepted_total", "counter", "Client connections accepted.", [("", stats["accepted"])])
    metric(
        "gaspar_requests_succeeded_total", "counter", "Requests answered with a reply.", [("", stats["succeeded"])]
    )
    failed = [(f'{{cause="{_escape_label(cause)}"}}', count) for cause, count in sorted(stats["failed"].items())]
    metric("gaspar_requests_failed_total", "counter", "Requests failed, by cause.", failed)
    metric(
        "gaspar_accept_errors_total",
        "counter",
        "accept() calls that failed for lack of descriptors or memory.",
        [("", stats["accept_errors"])],
    )
    metric("gaspar_requests_in_flight", "gauge", "Requests held by a worker.", [("", stats["in_flight"])])
    metric("gaspar_requests_queued", "gauge", "Requests waiting for a free worker.", [("", stats["queued"])])
    metric("gaspar_workers", "gauge", "Worker processes running.", [("", len(stats["workers"]))])
    metric(
        "gaspar_worker_restarts_total",
        "counter",
        "Workers replaced after a death, a recycle or a signal.",
        [("", stats["worker_restarts"])],
    )
    served = [(f'{{pid="{pid}"}}', count) for pid, count in sorted(stats["workers"].items())]
    metric("gaspar_worker_requests_served_total", "counter", "Requests answered by each running worker.", served)

    name = "gaspar_request_duration_seconds"
    lines.append(f"# HELP {name} Time from accepting a connection to sending its whole reply.")
    lines.append(f"# TYPE {name} histogram")
    for bound, count in latency.cumulative():
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines.append(f"{name}_sum {latency.sum}")
    lines.append(f"{name}_count {latency.count}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves /metrics and /healthz over HTTP/1.0 from an EventLoop.

    ``render()`` returns the metrics text and ``healthy()`` whether to
    answer /healthz with 200 rather than 503. Each connection gets one
    response and is closed.
    """

    def __init__(
        self, loop: EventLoop, host: str, port: int, render: Callable[[], str], healthy: Callable[[], bool]
    ) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.render = render
        self.healthy = healthy
        self.listener: Optional[socket.socket] = None
        # Open client socket -> the request bytes received so far, then the
        # response bytes still to send.
        self._clients: Dict[socket.socket, Union[bytes, memoryview]] = {}
        # Whether the listener is registered with the loop.
        self._accepting = False
        self._accept_errors = 0

    @property
    def address(self) -> Tuple[str, int]:
        """The bound (host, port). Raises RuntimeError before start() or after close()."""
        listener = self.listener
        if listener is None:
            raise RuntimeError("the metrics server is not listening; call start() first")
        address: Tuple[str, int] = listener.getsockname()[:2]
        return address

    def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.create_server((self.host, self.port), family=family)
        self.listener.setblocking(False)
        self._resume_accepting()

    def close(self) -> None:
        for sock in list(self._clients):
            self._close(sock)
        self._pause_accepting(None)
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _accept(self, listener: socket.socket, mask: int) -> None:
        while len(self._clients) < MAX_METRICS_CLIENTS:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Retrying at once would spin while the process is out of descriptors.
                if not self._accept_errors:
                    log.warning("metrics endpoint: accept failed: %s; pausing for %s s", exc, ACCEPT_PAUSE)
                self._accept_errors += 1
                self._pause_accepting(ACCEPT_PAUSE)
                return
            sock.setblocking(False)
            self._clients[sock] = b""
            self.loop.register(sock, selectors.EVENT_READ, self._read)
            self.loop.call_later(METRICS_CLIENT_TIMEOUT, functools.partial(self._close, sock))
        self._pause_accepting(None)

    def _pause_accepting(self, seconds: Optional[float]) -> None:
        """Stop watching the listener for ``seconds``, or until a client closes when None."""
        if self.listener is None or not self._accepting:
            return
        self.loop.unregister(self.listener)
        self._accepting = False
        if seconds is not None:
            self.loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.listener is not None and not self._accepting:
            self.loop.register(self.listener, selectors.EVENT_READ, self._accept)
            self._accepting = True

    def _read(self, sock: socket.socket, mask: int) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(sock)
            return
        if not data:
            self._close(sock)
            return
        received = self._clients[sock]
        if isinstance(received, memoryview):
            # A response is being sent, so the request head was already complete.
            return
        head = received + data
        complete = b"\r\n\r\n" in head or b"\n\n" in head
        if len(head) > MAX_REQUEST_HEAD:
            self._respond(sock, "431 Request Header Fields Too Large", "request head too large\n")
            return
        if not complete:
            self._clients[sock] = head
            return
        status, body = self._route(head)
        # A response to HEAD has the headers of GET's and no body.
        self._respond(sock, status, body, send_body=not head.startswith(b"HEAD "))

    def _route(self, head: bytes) -> Tuple[str, str]:
        request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = request_line.split()
        if len(parts) < 2:
            return "400 Bad Request", "invalid request line\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "only GET and HEAD are supported\n"
        if target == "/metrics":
            return "200 OK", self.render()
        if target == "/healthz":
            return ("200 OK", "OK\n") if self.healthy() else ("503 Service Unavailable", "stopping\n")
        return "404 Not Found", "not found; try /metrics or /healthz\n"

    def _respond(self, sock: socket.socket, status: str, body: str, send_body: bool = True) -> None:
        payload = body.encode("utf-8")
        head = (
            f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        self._clients[sock] = memoryview(head + payload if send_body else head)
        self.loop.modify(sock, selectors.EVENT_WRITE, self._write)
        self._write(sock, selectors.EVENT_WRITE)

    def _write(self, sock: socket.socket, mask: int) -> None:
        pending = self._clients.get(sock)
        if pending is None:
            return
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(sock)
            return
        if sent == len(pending):
            self._close(sock)
        else:
            self._clients[sock] = pending[sent:]

    def _close(self, sock: socket.socket) -> None:
        if self._clients.pop(sock, None) is None and sock.fileno() < 0:
            return
        try:
            self.loop.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        if len(self._clients) < MAX_METRICS_CLIENTS:
            self._resume_accepting()
