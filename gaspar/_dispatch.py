"""Which worker holds which request, and the queue of requests waiting for one.

The producer sends each request down the chosen worker's own PUSH socket,
so it always knows where every request is. That is what lets a worker's
death fail exactly its own requests, and lets a request go to an idle
worker instead of queueing behind a slow one, which plain PUSH round-robin
to all workers cannot do.

With prefetch above 1, a busy worker may hold more requests, queued in its
0MQ socket behind the one it runs, so it never waits idle for its next
request to travel to it. Each worker's ClaimRecord (gaspar._claims) keeps
that safe: queued requests go back to the producer's queue when another
worker is idle while their worker is still busy, and when their worker
dies before starting them.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from typing import Deque, Dict, Iterable, List, Optional, Tuple

from gaspar import _messages
from gaspar._connection import DISPATCHED, QUEUED, Connection, Payload
from gaspar.workers import WorkerProcess


class Dispatcher:
    """Least-loaded dispatch of requests to ready workers, with a FIFO queue.

    ``prefetch`` is how many requests one worker may hold. ``timeout`` is
    the seconds a request may stay with its worker, or None for no limit.
    """

    def __init__(self, prefetch: int, timeout: Optional[float]) -> None:
        self.prefetch = prefetch
        self.timeout = timeout
        # Workers that take new requests, in the order they became ready.
        self.ready: List[WorkerProcess] = []
        # Request id -> connection, for every DISPATCHED request.
        self.in_flight: Dict[int, Connection] = {}
        self.queue: Deque[Connection] = collections.deque()
        # Request id -> worker, for requests whose client left while a worker
        # held them: they keep their place until the worker replies, so a
        # worker still running one does not look free.
        self._orphans: Dict[int, WorkerProcess] = {}
        self._request_ids = itertools.count(1)
        self._rotation = 0
        # A heap of (deadline, request id, worker), one entry for the request
        # each worker runs: the timeout counts from when the worker starts it.
        self._deadlines: List[Tuple[float, int, WorkerProcess]] = []

    @property
    def load(self) -> int:
        """Requests queued or held by a worker."""
        return len(self.in_flight) + len(self.queue)

    def submit(self, conn: Connection, payload: Payload, now: float) -> None:
        """Send a complete request to a worker, or queue it if none is free.

        Raises zmq.ZMQError when the send fails; the request is then neither
        queued nor in flight.
        """
        worker = self._pick()
        if worker is None:
            conn.state = QUEUED
            conn.payload = payload
            self.queue.append(conn)
            return
        self._send(worker, conn, payload, now)

    def send_queued(self, now: float) -> List[Tuple[Connection, Exception]]:
        """Send queued requests to free workers; return those whose send failed."""
        failed: List[Tuple[Connection, Exception]] = []
        while self.queue:
            worker = self._pick()
            if worker is None:
                break
            conn = self.queue.popleft()
            if conn.state != QUEUED:
                continue
            payload = conn.payload
            if payload is None:
                failed.append((conn, RuntimeError(f"queued request {conn.request_id} has no payload")))
                continue
            try:
                self._send(worker, conn, payload, now)
            except Exception as exc:  # zmq.ZMQError, passed back to the caller to log
                failed.append((conn, exc))
        return failed

    def complete(self, request_id: int, now: float) -> Optional[Tuple[Connection, WorkerProcess]]:
        """Take a request back from its worker; return its connection and that worker, or None if it is gone."""
        conn = self.in_flight.pop(request_id, None)
        if conn is None:
            orphan_worker = self._orphans.pop(request_id, None)
            if orphan_worker is not None:
                self._advance(orphan_worker, request_id, now)
            return None
        worker = conn.worker
        if worker is None:
            raise RuntimeError(f"request {request_id} is in flight without a worker")
        self._advance(worker, request_id, now)
        worker.served += 1
        conn.payload = None
        return conn, worker

    def forget(self, request_id: int) -> Optional[Connection]:
        """Remove a dispatched request from the records; return its connection, or None if it is gone.

        The connection keeps its payload, so the request can be sent again.
        """
        conn = self.in_flight.pop(request_id, None)
        if conn is None:
            return None
        if conn.worker is not None:
            conn.worker.in_flight.pop(request_id, None)
        return conn

    def discard(self, conn: Connection) -> None:
        """Forget a request whose connection is closing before its reply."""
        if conn.state == DISPATCHED:
            if self.in_flight.pop(conn.request_id, None) is not None and conn.worker is not None:
                self._orphans[conn.request_id] = conn.worker
        elif conn.state == QUEUED:
            # O(n), but the queue is bounded by the in-flight limit.
            # send_queued() takes a connection off the queue before a send
            # that may fail, and its caller then discards it.
            if conn in self.queue:
                self.queue.remove(conn)
            conn.payload = None

    def add_worker(self, worker: WorkerProcess) -> None:
        """Start sending requests to a worker."""
        self.ready.append(worker)

    def pause_worker(self, worker: WorkerProcess) -> None:
        """Stop sending new requests to a worker; it keeps those it holds."""
        if worker in self.ready:
            self.ready.remove(worker)

    def remove_worker(self, worker: WorkerProcess) -> List[Connection]:
        """Forget a dead worker; return the connections of the requests it held, in the order it got them.

        Their payloads stay, so the caller can requeue those the worker never started.
        """
        self.pause_worker(worker)
        lost = []
        for request_id in worker.in_flight:
            conn = self.in_flight.pop(request_id, None)
            if conn is not None:
                lost.append(conn)
            else:
                self._orphans.pop(request_id, None)
        worker.in_flight.clear()
        return lost

    def take_back(self, worker: WorkerProcess, started: int, through: Optional[int] = None) -> List[Connection]:
        """Remove from ``worker`` the requests with ids above ``started`` (and up to ``through``).

        Returns their connections, payloads kept, in the order the worker
        got them; the caller requeues them. The worker must never run them:
        it is dead, or its ClaimRecord revoked them.
        """
        reclaimed = []
        for request_id in list(worker.in_flight):
            if request_id <= started or (through is not None and request_id > through):
                continue
            del worker.in_flight[request_id]
            self._orphans.pop(request_id, None)
            conn = self.in_flight.pop(request_id, None)
            if conn is not None:
                reclaimed.append(conn)
        if reclaimed:
            # The first request left may not have an entry yet.
            self._time_first(worker, worker.busy_since)
        return reclaimed

    def requeue(self, conns: List[Connection]) -> None:
        """Put requests that no worker started back at the head of the queue, in their order.

        Each connection must hold its payload; a later send gives it a new request id.
        """
        for conn in reversed(conns):
            conn.state = QUEUED
            conn.worker = None
            self.queue.appendleft(conn)

    def steal(self, workers: Iterable[WorkerProcess]) -> bool:
        """Take queued requests back from busy ``workers`` while a ready worker is idle.

        A worker gives up as many requests queued behind its current one as
        there are idle workers, oldest first, so no request waits behind
        another while a worker is free. They go to the head of the queue for
        send_queued(). Returns True when a worker held its claim record's
        lock, so the caller should try again soon.
        """
        idle = sum(1 for worker in self.ready if not worker.in_flight)
        retry = False
        for worker in workers:
            if idle == 0:
                break
            held_ids = list(worker.in_flight)
            if len(held_ids) < 2 or worker.claims is None:
                continue
            fence = held_ids[min(idle, len(held_ids) - 1)]
            started = worker.claims.revoke_through(fence)
            if started is None:
                # The worker is claiming a request at this moment.
                retry = True
                continue
            reclaimed = self.take_back(worker, started, through=fence)
            self.requeue(reclaimed)
            idle -= len(reclaimed)
        return retry

    def check_again(self, worker: WorkerProcess, request_id: int, at: float) -> None:
        """Have expired() look at ``request_id`` on ``worker`` again at ``at`` (time.monotonic())."""
        heapq.heappush(self._deadlines, (at, request_id, worker))

    def expired(self, now: float) -> List[Tuple[WorkerProcess, int]]:
        """Return (worker, request id) for each request that has run past the timeout."""
        expired = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, request_id, worker = heapq.heappop(deadlines)
            if not worker.in_flight or next(iter(worker.in_flight)) != request_id:
                # Replied to already. A request queued behind it gets its own entry when it starts.
                continue
            started = worker.busy_since
            if self.timeout is not None and started + self.timeout > now:
                heapq.heappush(deadlines, (started + self.timeout, request_id, worker))
                continue
            expired.append((worker, request_id))
        return expired

    def next_deadline(self) -> Optional[float]:
        """Return the earliest request deadline, or None."""
        return self._deadlines[0][0] if self._deadlines else None

    def _pick(self) -> Optional[WorkerProcess]:
        """Return an idle worker, rotating among them, else the least-loaded one below prefetch."""
        ready = self.ready
        count = len(ready)
        best = None
        best_load = self.prefetch
        for offset in range(count):
            index = (self._rotation + offset) % count
            worker = ready[index]
            load = len(worker.in_flight)
            if load == 0:
                self._rotation = index + 1
                return worker
            if load < best_load:
                best = worker
                best_load = load
        return best

    def _advance(self, worker: WorkerProcess, request_id: int, now: float) -> None:
        """Record that ``worker`` replied to ``request_id`` and goes on with the next one it holds."""
        worker.in_flight.pop(request_id, None)
        worker.busy_since = now
        self._time_first(worker, now)

    def _time_first(self, worker: WorkerProcess, started: float) -> None:
        """Start the timeout of the request ``worker`` runs first, which it began at ``started``."""
        if worker.in_flight and self.timeout is not None:
            heapq.heappush(self._deadlines, (started + self.timeout, next(iter(worker.in_flight)), worker))

    def _send(self, worker: WorkerProcess, conn: Connection, payload: Payload, now: float) -> None:
        # A new id for every send, also of a request taken back from another
        # worker, so the ids one worker gets only grow: its ClaimRecord's
        # revoke mark relies on that.
        request_id = next(self._request_ids)
        push = worker.push
        if push is None:
            raise RuntimeError(f"worker {worker.worker_id} takes requests but has no 0MQ socket")
        _messages.send_message(push, _messages.REQUEST, request_id, payload)
        conn.request_id = request_id
        conn.state = DISPATCHED
        conn.worker = worker
        # Kept until the reply, to send it again if it is taken back.
        conn.payload = payload
        was_idle = not worker.in_flight
        worker.in_flight[request_id] = None
        self.in_flight[request_id] = conn
        if was_idle:
            worker.busy_since = now
            self._time_first(worker, now)
