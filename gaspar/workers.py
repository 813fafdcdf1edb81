"""Forking, tracking and stopping worker processes (the Forker).

Workers are forked by the fork server (see gaspar._forkserver), so they are
its children, not the producer's. The producer learns of each worker's
birth and death over the fork server's control socket, and watches each
worker's sentinel, which reads EOF the moment the worker exits.
"""

from __future__ import annotations

import array
import logging
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING, Callable, Dict, Final, List, Literal, Optional, Tuple, Union

from gaspar import _forkserver

if TYPE_CHECKING:
    import zmq

    from gaspar._claims import ClaimRecord

log = logging.getLogger(__name__)


def describe_wait_status(status: int) -> str:
    """Return how a process ended, from an os.waitpid() status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {name}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


def _receive_record(sock: socket.socket) -> Tuple[bytes, List[int]]:
    """Receive one control record and the descriptors sent with it, without blocking."""
    # socket.recv_fds() drops its flags argument (CPython 3.11), so it would block.
    fd_size = array.array("i").itemsize
    record, ancillary, _, _ = sock.recvmsg(
        _forkserver.RECORD.size, socket.CMSG_SPACE(fd_size), socket.MSG_DONTWAIT
    )
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fd_size])
    return record, list(fds)


class WorkerProcess:
    """The producer's record of one worker process.

    ``worker_id`` is unique for the producer's lifetime, and a replacement gets
    a new one. ``in_flight`` maps the ids of the requests the worker holds,
    in the order they were sent to it, to None: the first one is the request
    the worker runs now or will run next.
    """

    __slots__ = (
        "worker_id",
        "pid",
        "sentinel",
        "ready",
        "in_flight",
        "served",
        "max_served",
        "retiring",
        "stop_sent",
        "timed_out",
        "push",
        "exit_status",
        "generation",
        "busy_since",
        "claims",
    )

    def __init__(self, worker_id: int, pid: int, sentinel: int) -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.sentinel = sentinel
        # Whether the worker ever reported ready.
        self.ready = False
        self.in_flight: Dict[int, None] = {}
        self.served = 0
        # Requests after which the worker is replaced; None for no limit.
        self.max_served: Optional[int] = None
        # A replacement has been asked for; the worker stops once it is ready.
        self.retiring = False
        # The producer sent SIGTERM, so the exit is expected.
        self.stop_sent = False
        # The worker was killed because a request ran past the timeout.
        self.timed_out = False
        # The producer's 0MQ socket that sends requests to this worker, once connected.
        self.push: Optional[zmq.Socket[bytes]] = None
        self.exit_status: Optional[int] = None
        # How many SIGHUP reloads had happened when the worker was forked.
        self.generation = 0
        # time.monotonic() when the worker began its current request, as far
        # as the producer can tell: when the request was sent to it while it
        # held none, or when its previous reply arrived.
        self.busy_since = 0.0
        # The worker's record of the requests it started, open once it is ready.
        self.claims: Optional[ClaimRecord] = None

    def close_sentinel(self) -> None:
        """Close the sentinel once it has read EOF or is no longer watched."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1

    def is_alive(self) -> bool:
        """Return whether the process is still running; safe from any thread."""
        # Read once: the producer's thread may close the sentinel meanwhile.
        sentinel = self.sentinel
        if sentinel < 0:
            return False
        poller = select.poll()
        try:
            poller.register(sentinel, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            # Closed between the read and the poll: the worker has exited.
            return False

    def __repr__(self) -> str:
        return f"<WorkerProcess id={self.worker_id} pid={self.pid} in_flight={len(self.in_flight)}>"


# Events that Forker.receive_events() returns.
SPAWNED: Final = "spawned"
EXITED: Final = "exited"
FORK_FAILED: Final = "fork_failed"

# (SPAWNED, worker, 0), (EXITED, worker, wait status) or (FORK_FAILED, worker id, errno).
Event = Union[
    Tuple[Literal["spawned", "exited"], WorkerProcess, int],
    Tuple[Literal["fork_failed"], int, int],
]


class Forker:
    """Starts workers through the fork server and tracks them.

    ``run_worker(worker_id)`` runs in each new worker process and returns its
    exit code. ``kill_timeout`` is how long, in seconds, workers get to exit
    after SIGTERM when the Forker closes, before SIGKILL.
    """

    def __init__(self, run_worker: Callable[[int, bool], int], kill_timeout: float = 10.0) -> None:
        self._run_worker = run_worker
        self.kill_timeout = kill_timeout
        self._server_pid: Optional[int] = None
        self._control: Optional[socket.socket] = None
        self._next_worker_id = 1
        # Every forked worker not reaped yet, by worker id.
        self.workers: Dict[int, WorkerProcess] = {}

    @property
    def processes(self) -> List[WorkerProcess]:
        """The workers that are running now."""
        # A copy, because the producer's thread changes the dict.
        return [worker for worker in list(self.workers.values()) if worker.is_alive()]

    def start(self) -> None:
        """Fork the fork server. Call it before the process starts any thread."""
        self._server_pid, self._control = _forkserver.start_fork_server(self._run_worker, self.kill_timeout)
        log.debug("fork server started (pid %d)", self._server_pid)

    def fileno(self) -> int:
        """Return the control socket's descriptor, readable when receive_events() has events."""
        if self._control is None:
            raise RuntimeError("Forker is not started")
        return self._control.fileno()

    def spawn(self, reload: bool = False) -> int:
        """Ask for one more worker; return its id. SPAWNED or FORK_FAILED follows.

        With ``reload``, the worker calls its consumer's reloaded() first.
        """
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        self._send(_forkserver.SPAWN, worker_id, 1 if reload else 0)
        return worker_id

    def kill(self, worker: WorkerProcess, signum: int = signal.SIGKILL) -> None:
        """Send a signal to a worker, through the fork server that reaps it.

        Going through the fork server means the pid cannot have been reused
        by an unrelated process.
        """
        self._send(_forkserver.KILL, worker.pid, signum)

    def receive_events(self) -> Optional[List[Event]]:
        """Read what the fork server reported; return None if it is gone.

        Each event is (SPAWNED, worker, 0), (EXITED, worker, wait status) or
        (FORK_FAILED, worker id, errno). An EXITED worker has left ``workers``,
        but its sentinel stays open for the caller to close.
        """
        control = self._control
        if control is None:
            raise RuntimeError("Forker is not started")
        events: List[Event] = []
        while True:
            try:
                record, fds = _receive_record(control)
            except BlockingIOError:
                return events
            except ConnectionResetError:
                return None
            if not record:
                return None if not events else events
            event = self._decode(record, fds)
            if event is not None:
                events.append(event)

    def _decode(self, record: bytes, fds: List[int]) -> Optional[Event]:
        kind, first, second = _forkserver.RECORD.unpack(record)
        if kind == _forkserver.SPAWNED:
            spawned = WorkerProcess(first, second, fds[0])
            self.workers[spawned.worker_id] = spawned
            return SPAWNED, spawned, 0
        for fd in fds:
            os.close(fd)
        if kind == _forkserver.EXITED:
            worker = next((w for w in self.workers.values() if w.pid == first), None)
            if worker is None:
                log.debug("fork server reaped unknown child %d: %s", first, describe_wait_status(second))
                return None
            del self.workers[worker.worker_id]
            worker.exit_status = second
            return EXITED, worker, second
        return FORK_FAILED, first, second

    def close(self, kill_timeout: Optional[float] = None) -> List[Event]:
        """Stop every worker and the fork server; return the last events.

        Workers get SIGTERM and, after ``kill_timeout`` seconds (default: the
        Forker's), SIGKILL; with 0 they get SIGKILL at once. Returns once the
        fork server has reaped every worker and has been reaped itself.
        """
        if self._control is None:
            return []
        events: List[Event] = []
        milliseconds = -1 if kill_timeout is None else int(kill_timeout * 1000)
        try:
            self._send(_forkserver.QUIT, milliseconds, 0)
            self._control.shutdown(socket.SHUT_WR)
        except OSError:
            pass

        deadline = time.monotonic() + self.kill_timeout + 5.0
        poller = select.poll()
        poller.register(self._control, select.POLLIN)
        while time.monotonic() < deadline:
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                break
            received = self.receive_events()
            if received is None:
                break
            events.extend(received)
        self._control.close()
        self._control = None
        self._reap_server(deadline)

        for worker in self.workers.values():
            worker.close_sentinel()
        for _, subject, _ in events:
            if isinstance(subject, WorkerProcess):
                subject.close_sentinel()
        self.workers.clear()
        return events

    def _reap_server(self, deadline: float) -> None:
        pid = self._server_pid
        self._server_pid = None
        if pid is None:
            return
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            if time.monotonic() >= deadline:
                log.error("fork server (pid %d) did not exit in time; killing it", pid)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            # The server closed its socket on the way out; exit is imminent.
            time.sleep(0.01)

    def _send(self, command: bytes, first: int, second: int) -> None:
        if self._control is None:
            raise RuntimeError("Forker is not started")
        self._control.send(_forkserver.RECORD.pack(command, first, second))
