"""The request loop that runs in each worker process after the fork."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from typing import Optional, Tuple, Union

import zmq

from gaspar import _messages
from gaspar._claims import ClaimRecord
from gaspar.consumers import Consumer, reply_to_buffer

log = logging.getLogger(__name__)

# Exit codes that tell the producer why a worker stopped.
EXIT_OK = 0
EXIT_ERROR = 1
# The setup hook raised: the worker never became ready.
EXIT_BOOT_ERROR = 3

_PR_SET_PDEATHSIG = 1
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# How long a stopping worker keeps trying to deliver its last replies, in ms.
_REPLY_LINGER_MS = 2000
# How long a worker waits for its 0MQ I/O thread to take its last message
# before it sends another or starts a request, in ms. Only a producer that
# stopped reading makes it wait that long.
_SEND_WAIT_MS = 30_000


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits.

    The parent of a worker is the single-threaded fork server, so the signal
    cannot fire early because some other thread of the parent ended.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        # NOTE: without prctl (not Linux) a worker outlives a killed fork
        # server until its next request fails to send.
        return
    if os.getppid() != parent:
        # The parent died before prctl took effect.
        os._exit(EXIT_ERROR)


class WorkerLoop:
    """Receive requests, run the consumer and send replies until SIGTERM.

    SIGTERM makes the worker ask the producer to stop it, and it exits once
    the producer's STOP arrives, after every request sent before it. SIGINT,
    SIGHUP, SIGTTIN and SIGTTOU are ignored, as in the fork server: a
    terminal or an operator may send them to the whole process group,
    and the producer decides when workers stop.
    """

    def __init__(
        self,
        consumer: Consumer,
        worker_id: int,
        request_endpoint: str,
        reply_endpoint: str,
        claims_path: str,
        max_memory: Optional[int] = None,
    ) -> None:
        self.consumer = consumer
        self.worker_id = worker_id
        self.request_endpoint = request_endpoint
        self.reply_endpoint = reply_endpoint
        # Where the worker keeps its ClaimRecord, which the producer opens on READY.
        self.claims_path = claims_path
        # Resident set size in bytes above which the worker asks to be replaced.
        self.max_memory = max_memory

    def run(self) -> int:
        """Serve until SIGTERM; return the process exit code."""
        die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        # The kernel may deliver SIGTERM to any thread that does not block it,
        # pyzmq's garbage-collector thread included, and then no blocking call
        # of the main thread is interrupted. The wake-up fd is written whichever
        # thread takes the signal, and the loop polls it beside the requests.
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        # The fork server blocks SIGTERM; one sent during the fork is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

        # A libzmq context does not survive fork(), so each worker makes its own.
        context = zmq.Context(io_threads=1)
        requests = context.socket(zmq.PULL)
        replies = context.socket(zmq.PUSH)
        # One message at most waits in this process for the 0MQ I/O thread,
        # so "writable" means the last one has left (see _wait_sent).
        replies.setsockopt(zmq.SNDHWM, 1)
        claims: Optional[ClaimRecord] = None
        try:
            requests.bind(self.request_endpoint)
            replies.connect(self.reply_endpoint)
            try:
                self.consumer.setup()
            except Exception:
                log.exception("worker %d (pid %d): setup() of %r failed", self.worker_id, os.getpid(), self.consumer)
                return EXIT_BOOT_ERROR
            try:
                claims = ClaimRecord.create(self.claims_path)
            except OSError as exc:
                log.error("worker %d (pid %d): cannot create %s: %s", self.worker_id, os.getpid(), self.claims_path, exc)
                return EXIT_BOOT_ERROR

            if _received_sigterm(wake_read):
                # Stopped while booting: nothing was sent to this worker yet.
                return EXIT_OK
            self._send(replies, _messages.READY, self.worker_id, _messages.PID.pack(os.getpid()))
            log.debug("worker %d (pid %d) ready", self.worker_id, os.getpid())
            self._serve(requests, replies, wake_read, claims)
            return EXIT_OK
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if claims is not None:
                # The producer reads it after this process exits, and removes it.
                claims.close()
            requests.close(linger=0)
            replies.close(linger=_REPLY_LINGER_MS)
            context.term()
            wake_read.close()
            wake_write.close()

    def _serve(
        self, requests: zmq.Socket[bytes], replies: zmq.Socket[bytes], wake_read: socket.socket, claims: ClaimRecord
    ) -> None:
        """Serve requests until the producer sends STOP.

        On SIGTERM the worker sends STOPPING and keeps serving: the producer
        stops sending it work and sends STOP behind the requests it already
        sent, so none of them is lost.
        """
        poller = zmq.Poller()
        poller.register(requests, zmq.POLLIN)
        wake_fd = wake_read.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        stopping = False
        while True:
            ready = dict(poller.poll())
            if requests in ready:
                kind, request_id, payload = _messages.receive_message(requests)
                if kind == _messages.STOP:
                    return
                if kind == _messages.REQUEST:
                    # A crash while the last reply is still in this process
                    # would lose that reply, so let it leave first.
                    self._wait_sent(replies)
                    if claims.claim(request_id):
                        self._serve_one(replies, request_id, payload, claims)
                    else:
                        # The producer took it back and sent it to another worker.
                        log.debug("worker %d: skipping revoked request %d", self.worker_id, request_id)
                else:
                    log.error("worker %d: ignoring message of unknown kind %d", self.worker_id, kind)
            if wake_fd in ready and _received_sigterm(wake_read) and not stopping:
                stopping = True
                log.info("worker %d (pid %d) received SIGTERM; stopping after its requests", self.worker_id, os.getpid())
                self._send(replies, _messages.STOPPING, self.worker_id)

    def _serve_one(
        self, replies: zmq.Socket[bytes], request_id: int, payload: memoryview, claims: ClaimRecord
    ) -> None:
        kind, reply = self._run_handler(request_id, payload.tobytes())
        if self.max_memory is not None and resident_memory() > self.max_memory:
            kind |= _messages.RECYCLE_FLAG
        if kind & ~_messages.RECYCLE_FLAG == _messages.REPLY:
            # If this process crashes before 0MQ writes the reply out, the
            # producer takes it from the record.
            claims.keep_reply(request_id, reply)
        self._send(replies, kind, request_id, reply)

    def _wait_sent(self, replies: zmq.Socket[bytes]) -> None:
        """Wait until the 0MQ I/O thread has taken the last message sent on ``replies``.

        With SNDHWM 1 the socket is writable exactly when the I/O thread
        has taken the last message, and it writes a message to the kernel
        right after it takes it, where the message survives a crash of this
        process.

        NOTE: the I/O thread takes a message before it writes it, so a
        crash can still catch one in between. The claim record keeps a copy
        of replies up to KEPT_REPLY_SIZE for that case; a larger one is lost.
        """
        if not replies.poll(_SEND_WAIT_MS, zmq.POLLOUT):
            log.warning(
                "worker %d (pid %d): the producer took no message for %d s",
                self.worker_id,
                os.getpid(),
                _SEND_WAIT_MS // 1000,
            )

    def _send(self, replies: zmq.Socket[bytes], kind: int, value: int, body: Union[bytes, bytearray, memoryview] = b"") -> None:
        """Send one message to the producer once the previous one has left; raise zmq.Again if it never does."""
        self._wait_sent(replies)
        _messages.send_message(replies, kind, value, body)

    def _run_handler(self, request_id: int, message: bytes) -> Tuple[int, Union[bytes, bytearray, memoryview]]:
        """Run the handler on one request; return the message kind (REPLY or FAILED) and the reply body."""
        try:
            return _messages.REPLY, reply_to_buffer(self.consumer.handle(message))
        except (Exception, SystemExit, KeyboardInterrupt):
            # sys.exit() in a handler fails its request, not the worker.
            log.exception(
                "worker %d (pid %d): handler failed on request %d",
                self.worker_id,
                os.getpid(),
                request_id,
            )
            return _messages.FAILED, b""


def resident_memory() -> int:
    """Return this process's resident set size in bytes, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * _PAGE_SIZE


def _received_sigterm(wake_read: socket.socket) -> bool:
    try:
        signal_numbers = wake_read.recv(64)
    except BlockingIOError:
        return False
    return signal.SIGTERM in signal_numbers
