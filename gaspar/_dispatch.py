"""Which worker holds which request, and the queue of requests waiting for one.

The producer sends each request down the chosen worker's own PUSH socket,
so it always knows where every request is. That is what lets a worker's
death fail exactly its own requests, and lets a request go to an idle
worker instead of queueing behind a slow one, which plain PUSH round-robin
to all workers cannot do.
"""

from __future__ import annotations

import collections
import itertools
from typing import Deque, Dict, List, Optional, Tuple

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
        self._request_ids = itertools.count(1)
        self._rotation = 0
        # (deadline, request id, worker) in dispatch order; with one timeout
        # for all requests, deadlines come out sorted.
        self._deadlines: Deque[Tuple[float, int, WorkerProcess]] = collections.deque()

    @property
    def load(self) -> int:
        """Requests queued or held by a worker."""
        return len(self.in_flight) + len(self.queue)

    def submit(self, conn: Connection, payload: Payload, now: float) -> None:
        """Send a complete request to a worker, or queue it if none is free.

        Raises zmq.ZMQError when the send fails; the request is then neither
        queued nor in flight.
        """
        conn.request_id = next(self._request_ids)
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
            conn.payload = None
            if payload is None:
                failed.append((conn, RuntimeError(f"queued request {conn.request_id} has no payload")))
                continue
            try:
                self._send(worker, conn, payload, now)
            except Exception as exc:  # zmq.ZMQError, passed back to the caller to log
                failed.append((conn, exc))
        return failed

    def complete(self, request_id: int) -> Optional[Tuple[Connection, WorkerProcess]]:
        """Take a request back from its worker; return its connection and that worker, or None if it is gone."""
        conn = self.in_flight.pop(request_id, None)
        if conn is None:
            return None
        worker = conn.worker
        if worker is None:
            raise RuntimeError(f"request {request_id} is in flight without a worker")
        worker.in_flight.discard(request_id)
        worker.served += 1
        return conn, worker

    def discard(self, conn: Connection) -> None:
        """Forget a request whose connection is closing before its reply."""
        if conn.state == DISPATCHED:
            self.in_flight.pop(conn.request_id, None)
            if conn.worker is not None:
                conn.worker.in_flight.discard(conn.request_id)
        elif conn.state == QUEUED:
            # O(n), but the queue is bounded by the in-flight limit.
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
        """Forget a dead worker; return the connections of the requests it held."""
        self.pause_worker(worker)
        lost = []
        for request_id in worker.in_flight:
            conn = self.in_flight.pop(request_id, None)
            if conn is not None:
                lost.append(conn)
        worker.in_flight.clear()
        return lost

    def expired(self, now: float) -> List[Tuple[WorkerProcess, int]]:
        """Return (worker, request id) for each request held past the timeout."""
        expired = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, request_id, worker = deadlines.popleft()
            if request_id in worker.in_flight:
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

    def _send(self, worker: WorkerProcess, conn: Connection, payload: Payload, now: float) -> None:
        request_id = conn.request_id
        push = worker.push
        if push is None:
            raise RuntimeError(f"worker {worker.worker_id} takes requests but has no 0MQ socket")
        _messages.send_message(push, _messages.REQUEST, request_id, payload)
        conn.state = DISPATCHED
        conn.worker = worker
        worker.in_flight.add(request_id)
        self.in_flight[request_id] = conn
        if self.timeout is not None:
            self._deadlines.append((now + self.timeout, request_id, worker))
