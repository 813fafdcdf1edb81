"""The fork server: a single-threaded process that forks every worker.

The producer runs 0MQ I/O threads, and an embedding application may run
threads of its own. A child forked from such a process inherits every lock
another thread held at that moment, still locked. So the producer forks this
server once, before it starts any thread, and asks it over a socket for each
worker, the first ones and every replacement.

Control messages are fixed-size records on an AF_UNIX SOCK_SEQPACKET pair,
which keeps record boundaries and carries file descriptors::

    producer -> server   SPAWN  worker id, 1 to reload the handler's code or 0
    producer -> server   KILL   pid, signal number
    producer -> server   QUIT   kill timeout in ms, or -1 for the default
                                (stop every worker, then exit)
    server -> producer   SPAWNED  worker id, pid   + the worker's sentinel fd
    server -> producer   EXITED   pid, wait status
    server -> producer   FORK_FAILED  worker id, errno

The sentinel is the read end of a pipe whose write end only the worker
holds: it reads EOF as soon as the worker exits, however it exits.
On QUIT the server sends SIGTERM to every worker, waits for them, sends
SIGKILL to any left after the kill timeout, reaps them all and exits. EOF
on the socket without QUIT means the producer died: the server kills every
worker with SIGKILL at once, so no orphan keeps running.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from typing import Callable, Dict, Optional, Tuple

log = logging.getLogger(__name__)

RECORD = struct.Struct("!cqq")

SPAWN = b"S"
KILL = b"K"
QUIT = b"Q"
SPAWNED = b"W"
EXITED = b"X"
FORK_FAILED = b"F"

# How often the server polls for children to reap, in seconds. A child is
# normally reaped as soon as its sentinel reads EOF; polling catches the rare
# child that closed its own sentinel.
_REAP_INTERVAL = 0.5
_DYING_POLL = 0.005


def _flush_stdio() -> None:
    # Buffered output would otherwise be written twice: by parent and child.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def start_fork_server(run_worker: Callable[[int, bool], int], kill_timeout: float) -> Tuple[int, socket.socket]:
    """Fork the fork server; return (pid, the producer's end of the control socket).

    ``run_worker(worker_id, reload)`` runs in each forked worker and returns
    its exit code. The caller must reap the returned pid.
    """
    producer_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Blocking mode, whatever socket.setdefaulttimeout() sets: the producer's
    # MSG_DONTWAIT reads would otherwise wait out the timeout.
    producer_end.settimeout(None)
    server_end.settimeout(None)
    _flush_stdio()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            producer_end.close()
            code = ForkServer(server_end, run_worker, kill_timeout).serve()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    server_end.close()
    return pid, producer_end


class ForkServer:
    """The loop of the fork server process."""

    def __init__(self, control: socket.socket, run_worker: Callable[[int, bool], int], kill_timeout: float) -> None:
        self.control = control
        self.run_worker = run_worker
        self.kill_timeout = kill_timeout
        self.quit_kill_timeout = kill_timeout
        self.selector = selectors.DefaultSelector()
        # pid -> the server's own copy of that worker's sentinel
        self.sentinels: Dict[int, int] = {}
        self.children: set[int] = set()

    def serve(self) -> int:
        """Serve spawn and kill requests until the producer closes the socket."""
        # The producer decides when workers stop; a signal sent to the whole
        # process group must not take the fork server down first. SIGTERM is
        # blocked, not ignored: a new worker inherits the mask, so a SIGTERM
        # that arrives before the worker installs its handler stays pending
        # instead of being lost.
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        signal.set_wakeup_fd(-1)

        self.selector.register(self.control, selectors.EVENT_READ)
        while True:
            # A child whose sentinel read EOF is exiting: poll soon to reap it.
            dying = len(self.children) > len(self.selector.get_map()) - 1
            for key, _ in self.selector.select(_DYING_POLL if dying else _REAP_INTERVAL):
                if key.fileobj is self.control:
                    command = self._handle_command()
                    if command == QUIT:
                        self._stop_children(self.quit_kill_timeout)
                        return 0
                    if command is None:
                        self._stop_children(0.0)
                        return 0
                else:
                    self.selector.unregister(key.fileobj)
            self._reap()

    def _handle_command(self) -> Optional[bytes]:
        """Carry out one command; return it, or None at EOF."""
        try:
            record = self.control.recv(RECORD.size)
        except ConnectionResetError:
            record = b""
        if not record:
            return None

        command: bytes
        first: int
        second: int
        command, first, second = RECORD.unpack(record)
        if command == SPAWN:
            self._spawn(first, bool(second))
        elif command == KILL:
            if first in self.children:
                os.kill(first, second)
        elif command == QUIT:
            # The producer may ask for a shorter wait than the default.
            self.quit_kill_timeout = first / 1000 if first >= 0 else self.kill_timeout
        else:
            log.error("fork server: ignoring unknown command %r", command)
        return command

    def _spawn(self, worker_id: int, reload: bool) -> None:
        sentinel_read, sentinel_write = os.pipe()
        _flush_stdio()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(sentinel_read)
            os.close(sentinel_write)
            log.error("fork server: fork() for worker %d failed: %s", worker_id, exc)
            self._send(FORK_FAILED, worker_id, exc.errno or 0)
            return

        if pid == 0:
            self._become_worker(worker_id, reload, sentinel_read)

        os.close(sentinel_write)
        self.children.add(pid)
        self.sentinels[pid] = sentinel_read
        self.selector.register(sentinel_read, selectors.EVENT_READ)
        socket.send_fds(self.control, [RECORD.pack(SPAWNED, worker_id, pid)], [sentinel_read])

    def _become_worker(self, worker_id: int, reload: bool, sentinel_read: int) -> None:
        code = 1
        try:
            # Descriptors the worker must not hold: the control socket, so
            # the producer's EOF reaches the server, and other sentinels.
            self.selector.close()
            self.control.close()
            os.close(sentinel_read)
            for fd in self.sentinels.values():
                os.close(fd)
            code = self.run_worker(worker_id, reload)
        except BaseException:
            traceback.print_exc()
        finally:
            _flush_stdio()
            os._exit(code)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._forget(pid)
            self._send(EXITED, pid, status)

    def _forget(self, pid: int) -> None:
        self.children.discard(pid)
        sentinel = self.sentinels.pop(pid, None)
        if sentinel is not None:
            if sentinel in self.selector.get_map():
                self.selector.unregister(sentinel)
            os.close(sentinel)

    def _send(self, kind: bytes, first: int, second: int) -> None:
        try:
            self.control.send(RECORD.pack(kind, first, second))
        except OSError:
            # The producer is gone; the server stops on its next read.
            pass

    def _stop_children(self, kill_timeout: float) -> None:
        """Send SIGTERM, wait up to kill_timeout seconds, SIGKILL the rest; reap all."""
        # The control socket may be at EOF, which would keep the selector awake.
        self.selector.unregister(self.control)
        for pid in self.children:
            _signal_quietly(pid, signal.SIGTERM if kill_timeout > 0 else signal.SIGKILL)

        deadline = time.monotonic() + kill_timeout
        while self.children and time.monotonic() < deadline:
            # Once every sentinel has read EOF, the rest is waiting for exits.
            interval = _DYING_POLL if not self.selector.get_map() else _REAP_INTERVAL
            timeout = min(interval, max(0.0, deadline - time.monotonic()))
            for key, _ in self.selector.select(timeout):
                self.selector.unregister(key.fileobj)
            self._reap()

        for pid in list(self.children):
            _signal_quietly(pid, signal.SIGKILL)
        for pid in list(self.children):
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            self._forget(pid)
            self._send(EXITED, pid, status)


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
