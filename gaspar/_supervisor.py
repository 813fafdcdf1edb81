"""Worker supervision for the producer: readiness, replacement, recycling and stopping.

Every worker comes from the fork server (gaspar._forkserver). The supervisor
learns of its birth and exit from the Forker, of its death at once from its
sentinel, and of its readiness from its READY message. A worker that dies
is replaced, a worker due for recycling is replaced before it stops taking
work, and a replacement that fails to start is retried with a growing delay.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import selectors
import signal
import time
from typing import Callable, Dict, List, Optional, Tuple

import zmq

from gaspar import _messages
from gaspar._claims import ClaimRecord
from gaspar._connection import Connection
from gaspar._dispatch import Dispatcher
from gaspar._loop import EventLoop
from gaspar._rejections import TIMEOUT, WORKER_DIED
from gaspar._worker import EXIT_BOOT_ERROR, WorkerLoop
from gaspar.consumers import Consumer
from gaspar.errors import GasparError, StartupError
from gaspar.workers import EXITED, FORK_FAILED, SPAWNED, Event, Forker, WorkerProcess, describe_wait_status

log = logging.getLogger(__name__)

# Workers that may fail to become ready in a row, after startup, before the
# producer gives up; the retry delay doubles from BOOT_RETRY_DELAY seconds.
MAX_BOOT_FAILURES = 5
BOOT_RETRY_DELAY = 0.5
# Seconds between a worker's death and failing the requests it held, for
# replies it sent just before exiting to arrive.
REPLY_GRACE = 0.2
# Seconds before a timeout check tries again when the worker held its claim
# record's lock.
REVOKE_RETRY = 0.001

FailRequest = Callable[[Connection, str, str], None]


def count_text(number: int, singular: str, plural: Optional[str] = None) -> str:
    """Return "1 worker" or "3 workers"."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


class Supervisor:
    """Keeps the producer's workers running and tells the dispatcher which ones take work.

    ``fail_request(conn, cause, detail)`` resets a client whose request was
    lost; ``send_queued()`` sends queued requests to free workers;
    ``deliver_reply(request_id, body)`` writes a reply taken from a dead
    worker's claim record; ``fail(error)`` stops the producer for good.
    """

    def __init__(
        self,
        consumer: Consumer,
        forker: Forker,
        dispatcher: Dispatcher,
        loop: EventLoop,
        runtime_dir: str,
        *,
        max_requests: Optional[int],
        max_requests_jitter: int,
        max_worker_memory: Optional[int],
        timeout: Optional[float],
        fail_request: FailRequest,
        send_queued: Callable[[], None],
        deliver_reply: Callable[[int, memoryview], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.consumer = consumer
        self.forker = forker
        self.dispatcher = dispatcher
        self.loop = loop
        self.runtime_dir = runtime_dir
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.max_worker_memory = max_worker_memory
        self.timeout = timeout
        self._fail_request = fail_request
        self._send_queued = send_queued
        self._deliver_reply = deliver_reply
        self._fail = fail
        self.context: Optional[zmq.Context[zmq.Socket[bytes]]] = None
        # Before startup ends, a worker that fails to start fails start().
        self.started = False
        self.stopping = False
        self.startup_error: Optional[StartupError] = None
        self.restarts = 0
        # After the first SIGHUP every new worker reloads the handler, or a
        # later replacement would run the code the fork server imported.
        self._reload = False
        # SIGHUPs so far, and the generation each requested worker is forked in.
        self.generation = 0
        self._spawn_generations: Dict[int, int] = {}
        # Workers to retire as soon as they are ready (SIGTTOU with none to spare).
        self._surplus = 0
        # When the current round of boot-failure retries is due.
        self._retry_at = 0.0
        self._boot_failures = 0
        self._early_ready: Dict[int, int] = {}
        # Request id -> when to stop waiting for the reply of a request that
        # passed its timeout after its worker had finished it.
        self._late_replies: Dict[int, float] = {}

    # -- endpoints and the worker process ---------------------------------

    def request_endpoint(self, worker_id: int) -> str:
        return f"ipc://{self.runtime_dir}/worker-{worker_id}"

    def reply_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir}/replies"

    def claims_path(self, worker_id: int) -> str:
        return os.path.join(self.runtime_dir, f"worker-{worker_id}.claims")

    def run_worker(self, worker_id: int, reload: bool) -> int:
        """Serve requests in a new worker process until STOP; return its exit code."""
        consumer = self.consumer
        if reload:
            try:
                consumer = consumer.reloaded()
            except Exception:
                log.exception("worker %d (pid %d): reloading %r failed", worker_id, os.getpid(), consumer)
                return EXIT_BOOT_ERROR
        max_memory = None if self.max_worker_memory is None else self.max_worker_memory * 1024 * 1024
        loop = WorkerLoop(
            consumer,
            worker_id,
            self.request_endpoint(worker_id),
            self.reply_endpoint(),
            self.claims_path(worker_id),
            max_memory=max_memory,
        )
        return loop.run()

    # -- messages and events ------------------------------------------------

    def handle_ready(self, worker_id: int, pid: int) -> None:
        """Start sending work to a worker that reported READY."""
        worker = self.forker.workers.get(worker_id)
        if worker is None:
            # READY overtook the fork server's SPAWNED record.
            self._early_ready[worker_id] = pid
            return
        self._connect(worker)
        try:
            worker.claims = ClaimRecord.open(self.claims_path(worker_id))
        except OSError as exc:
            # NOTE: without its record, the worker's queued requests are
            # neither taken back for idle workers nor resent after its death.
            log.warning("worker %d (pid %d): cannot open its claim record: %s", worker_id, pid, exc)
        worker.ready = True
        if self.max_requests is not None:
            worker.max_served = self.max_requests + random.randint(0, self.max_requests_jitter)
        self._boot_failures = 0
        log.info("worker %d (pid %d) ready", worker_id, pid)

        dispatcher = self.dispatcher
        dispatcher.add_worker(worker)
        if self._surplus:
            # SIGTTOU came while every worker was being replaced: this one goes,
            # and still lets an old worker stop below.
            self._surplus -= 1
            self._retire_without_replacement(worker)
        elif worker.generation < self.generation:
            # Forked before the last SIGHUP, so it may run the code that SIGHUP replaced.
            self.recycle(worker, "was forked before the last SIGHUP")
        # A ready replacement lets the oldest retiring worker stop taking work.
        for old in dispatcher.ready:
            if old.retiring and old is not worker:
                dispatcher.pause_worker(old)
                self.stop_worker(old)
                break
        # Requests may have queued while no worker was free. READY can also
        # arrive before SPAWNED, and then no reply handler sends them.
        if dispatcher.queue:
            self._send_queued()

    def handle_stopping(self, worker_id: int) -> None:
        """Replace a worker that received SIGTERM, and let it finish what it holds.

        While the producer itself is stopping, the worker keeps serving until
        the drain ends: systemd sends SIGTERM to every process of the service.
        """
        worker = self.forker.workers.get(worker_id)
        if worker is None or worker.stop_sent or self.stopping:
            return
        self.recycle(worker, "received SIGTERM")
        self.dispatcher.pause_worker(worker)
        self.stop_worker(worker)

    def handle_forker_events(self, fd: int, mask: int) -> None:
        events = self.forker.receive_events()
        if events is None:
            self._fail(GasparError("the fork server exited unexpectedly; no worker can be replaced"))
            return
        for event in events:
            # Comparing event[0], not an unpacked copy, lets type checkers narrow the tuple type.
            if event[0] == SPAWNED:
                _, worker, _ = event
                worker.generation = self._spawn_generations.pop(worker.worker_id, self.generation)
                watch_sentinel = functools.partial(self._handle_sentinel, worker)
                self.loop.register(worker.sentinel, selectors.EVENT_READ, watch_sentinel)
                pid = self._early_ready.pop(worker.worker_id, None)
                if pid is not None:
                    self.handle_ready(worker.worker_id, pid)
            else:
                self.log_event(event)
                if event[0] == EXITED:
                    _, worker, status = event
                    self._handle_exit(worker, status)
                elif event[0] == FORK_FAILED:
                    _, _, error_number = event
                    self._handle_boot_failure(f"fork() failed: {os.strerror(error_number)}")

    def log_event(self, event: Event) -> None:
        if event[0] == EXITED:
            _, worker, status = event
            expected = self.stopping or worker.stop_sent
            level = logging.INFO if expected and status == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", worker.worker_id, worker.pid, describe_wait_status(status))
        elif event[0] == FORK_FAILED:
            _, worker_id, error_number = event
            log.error("fork() of worker %d failed: %s", worker_id, os.strerror(error_number))

    def expire_requests(self, now: float) -> None:
        """Kill the worker of each request that ran past the handler timeout."""
        if self._late_replies:
            # Entries of replies that arrived in time are no longer needed.
            self._late_replies = {rid: at for rid, at in self._late_replies.items() if at + REPLY_GRACE > now}
        for worker, request_id in self.dispatcher.expired(now):
            if worker.timed_out or worker.sentinel < 0:
                # Killed already, or dead: its requests fail as "worker died".
                continue
            started = request_id
            unstarted: List[Connection] = []
            if worker.claims is not None:
                # Revoke what is queued behind first, so the worker cannot
                # start it between this check and the kill.
                started_or_none = worker.claims.revoke_through(next(reversed(worker.in_flight)))
                if started_or_none is None:
                    # The worker is claiming a request at this moment.
                    self.dispatcher.check_again(worker, request_id, now + REVOKE_RETRY)
                    continue
                started = started_or_none
                unstarted = self.dispatcher.take_back(worker, started)
                if started > request_id:
                    # It finished this request and started a later one, so the
                    # reply has left it (see WorkerLoop._wait_sent) and is on its way.
                    self._requeue(unstarted)
                    self._wait_for_late_reply(worker, request_id, now)
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
            self.dispatcher.pause_worker(worker)
            conn = self.dispatcher.forget(request_id)
            if conn is not None:
                self._fail_request(conn, TIMEOUT, f"worker {worker.worker_id} (pid {worker.pid}) was killed")
            self._requeue(unstarted)

    def _wait_for_late_reply(self, worker: WorkerProcess, request_id: int, now: float) -> None:
        """Wait REPLY_GRACE seconds for the reply to a request its worker finished, then fail the request."""
        give_up_at = self._late_replies.setdefault(request_id, now + REPLY_GRACE)
        if now < give_up_at:
            self.dispatcher.check_again(worker, request_id, give_up_at)
            return
        del self._late_replies[request_id]
        conn = self.dispatcher.forget(request_id)
        if conn is not None:
            log.error("request %d: worker %d finished it, but its reply never arrived", request_id, worker.worker_id)
            self._fail_request(conn, TIMEOUT, f"the reply from worker {worker.worker_id} was lost")

    def _requeue(self, conns: List[Connection]) -> None:
        """Put requests no worker started back in the queue and send what free workers can take."""
        if conns:
            self.dispatcher.requeue(conns)
            self._send_queued()

    def after_reply(self, worker: WorkerProcess, over_memory: bool) -> None:
        """Recycle a worker that is over its memory limit or served its max_requests."""
        if over_memory:
            self.recycle(worker, f"is above the memory limit of {self.max_worker_memory} MiB")
        elif worker.max_served is not None and worker.served >= worker.max_served:
            self.recycle(worker, f"served {worker.served} requests")

    # -- replacing and stopping workers -----------------------------------

    def spawn(self, count: int = 1) -> None:
        """Fork new workers, with the handler reloaded once a SIGHUP asked for it."""
        for _ in range(count):
            worker_id = self.forker.spawn(self._reload)
            self._spawn_generations[worker_id] = self.generation

    def recycle(self, worker: WorkerProcess, reason: str) -> None:
        """Fork a replacement now; the worker stops taking work once the replacement is ready."""
        if worker.retiring or self.stopping:
            return
        worker.retiring = True
        log.info("worker %d (pid %d) %s; replacing it", worker.worker_id, worker.pid, reason)
        self.restarts += 1
        self.spawn()

    def restart_all(self, reason: str) -> None:
        """Replace every worker with one that reloads the handler, without failing a request.

        A worker still starting is replaced once it is ready, so a second
        SIGHUP during a rolling restart is not lost.
        """
        self._reload = True
        self.generation += 1
        workers = list(self.dispatcher.ready)
        log.info("%s: replacing all %s", reason, count_text(len(workers), "worker"))
        for worker in workers:
            self.recycle(worker, "is due for a reload")

    def retire_one(self) -> None:
        """Stop, for good, the worker ready longest that is not being replaced.

        During a rolling restart every ready worker may be retiring already;
        then the next worker to become ready is retired instead.
        """
        candidates = [worker for worker in self.dispatcher.ready if not worker.retiring]
        if not candidates:
            self._surplus += 1
            return
        self._retire_without_replacement(candidates[0])

    def _retire_without_replacement(self, worker: WorkerProcess) -> None:
        worker.retiring = True
        log.info("retiring worker %d (pid %d) without a replacement", worker.worker_id, worker.pid)
        self.dispatcher.pause_worker(worker)
        self.stop_worker(worker)

    def stop_worker(self, worker: WorkerProcess) -> None:
        """Send STOP: the worker exits after the requests already sent to it."""
        if worker.stop_sent or worker.sentinel < 0:
            return
        worker.stop_sent = True
        push = worker.push
        if push is None:
            push = self._connect(worker)
        try:
            _messages.send_message(push, _messages.STOP, 0)
        except zmq.ZMQError as exc:
            log.warning("worker %d (pid %d): sending STOP failed: %s", worker.worker_id, worker.pid, exc)

    def stop_all(self, kill_now: bool) -> None:
        """Stop every worker and the fork server, then close the workers' sockets.

        With ``kill_now`` the workers get SIGKILL at once: their requests were
        failed already. Otherwise each gets STOP, then SIGTERM and, after the
        kill timeout, SIGKILL.
        """
        workers = list(self.forker.workers.values())
        if self.context is not None:
            for worker in workers:
                self.stop_worker(worker)
        for event in self.forker.close(0.0 if kill_now else None):
            self.log_event(event)
        for worker in workers:
            if worker.push is not None:
                worker.push.close(linger=0)
                worker.push = None
            if worker.claims is not None:
                worker.claims.close(unlink=True)
                worker.claims = None

    def _connect(self, worker: WorkerProcess) -> zmq.Socket[bytes]:
        """Connect a PUSH socket to a worker's request endpoint, store it in ``worker.push`` and return it."""
        context = self.context
        if context is None:
            raise RuntimeError("the supervisor has no 0MQ context; set Supervisor.context before workers connect")
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        # Long enough to deliver a STOP at teardown; 0MQ queues a message sent
        # before the worker binds, so this also reaches a worker still booting.
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self.request_endpoint(worker.worker_id))
        worker.push = push
        return push

    def _handle_sentinel(self, worker: WorkerProcess, fd: int, mask: int) -> None:
        """React to a worker's death at once; its exit status comes later."""
        self._retire(worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop using a dead worker and fail exactly the requests it held."""
        if worker.sentinel < 0:
            return
        self.loop.unregister(worker.sentinel)
        worker.close_sentinel()
        if worker.push is not None:
            worker.push.close(linger=0)
            worker.push = None
        self.dispatcher.pause_worker(worker)
        # The worker is dead, so its claim record is final: the requests it
        # never started go to other workers now.
        resent = 0
        kept: Tuple[int, bytes] = (0, b"")
        if worker.claims is not None:
            unstarted = self.dispatcher.take_back(worker, worker.claims.started)
            kept = worker.claims.kept_reply()
            worker.claims.close(unlink=True)
            worker.claims = None
            if unstarted:
                resent = len(unstarted)
                self._requeue(unstarted)
                if self.stopping and not self.dispatcher.ready:
                    # No worker is left to run them, and none is forked while stopping.
                    for conn in list(self.dispatcher.queue):
                        self._fail_request(conn, WORKER_DIED, "no worker is left while the producer stops")
        # Replies the worker sent just before it exited may still be on their
        # way through 0MQ, so the requests it started fail only after a grace period.
        self.loop.call_later(REPLY_GRACE, functools.partial(self._fail_held, worker, resent, kept))

    def _fail_held(self, worker: WorkerProcess, resent: int, kept: Tuple[int, bytes]) -> None:
        """Fail the requests a dead worker started once its late replies had time to arrive.

        ``resent`` is how many requests it never started went back to the
        queue. ``kept`` is the (request id, reply) its claim record kept: a
        reply the crash caught inside the worker is delivered from there.
        """
        kept_id, kept_body = kept
        if kept_id in worker.in_flight and kept_id in self.dispatcher.in_flight:
            log.info("worker %d (pid %d): delivering the reply to request %d from its claim record", worker.worker_id, worker.pid, kept_id)
            self._deliver_reply(kept_id, memoryview(kept_body))
        lost = self.dispatcher.remove_worker(worker)
        for conn in lost:
            self._fail_request(conn, WORKER_DIED, f"worker {worker.worker_id} (pid {worker.pid}) died")
        if lost or resent or not (self.stopping or worker.stop_sent or worker.timed_out or not worker.ready):
            log.warning(
                "worker %d (pid %d) died; %s failed with it%s",
                worker.worker_id,
                worker.pid,
                count_text(len(lost), "request it held", "requests it held"),
                f"; {count_text(resent, 'request')} it had not started went back to the queue" if resent else "",
            )

    def _handle_exit(self, worker: WorkerProcess, status: int) -> None:
        """Replace a reaped worker, unless it was retiring or never became ready.

        ``status`` is the worker's os.waitpid() status.
        """
        self._retire(worker)
        if self.stopping or worker.retiring:
            return
        if not worker.ready:
            self._handle_boot_failure(
                f"worker {worker.worker_id} (pid {worker.pid}) "
                f"{describe_wait_status(status)} before it was ready"
            )
            return
        self.restarts += 1
        self.spawn()

    def _handle_boot_failure(self, reason: str) -> None:
        """Retry with a growing delay; give up after MAX_BOOT_FAILURES in a row."""
        if not self.started:
            self.startup_error = StartupError(f"{reason}; see the worker's log above")
            return
        # Workers that fail together (all replacements of one SIGHUP, say)
        # count as one failed round and are retried together.
        now = time.monotonic()
        if now >= self._retry_at:
            self._boot_failures += 1
            if self._boot_failures >= MAX_BOOT_FAILURES:
                self._fail(
                    StartupError(f"{reason}; {MAX_BOOT_FAILURES} rounds of workers in a row failed to start, giving up")
                )
                return
            self._retry_at = now + BOOT_RETRY_DELAY * 2 ** (self._boot_failures - 1)
        log.error("%s; retrying in %.1f s", reason, self._retry_at - now)
        self.loop.call_later(self._retry_at - now, self.spawn)
