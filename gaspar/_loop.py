"""The producer's event loop: a selector, timers, and a wake-up socket for threads and signals."""

from __future__ import annotations

import heapq
import itertools
import selectors
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Tuple

# The byte another thread writes to wake the loop. Signal numbers, written by
# the C-level signal handler through signal.set_wakeup_fd(), are never 0.
_WAKE_BYTE = b"\0"


class EventLoop:
    """A selectors loop whose callbacks are called as ``callback(fileobj, mask)``.

    ``on_wake()`` runs when another thread called wake(), and
    ``on_signal(signum)`` when a signal routed by install_signal_handlers()
    arrived, both in the loop's thread.
    """

    def __init__(self, on_wake: Callable[[], None], on_signal: Callable[[int], None]) -> None:
        self.selector = selectors.DefaultSelector()
        self._on_wake = on_wake
        self._on_signal = on_signal
        self._timers: List[Tuple[float, int, Callable[[], object]]] = []
        self._timer_ids = itertools.count()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.selector.register(self._wake_read, selectors.EVENT_READ, self._handle_wake)

    def register(self, fileobj: Any, events: int, callback: Callable[[Any, int], None]) -> None:
        self.selector.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: Callable[[Any, int], None]) -> None:
        self.selector.modify(fileobj, events, callback)

    def unregister(self, fileobj: Any) -> None:
        self.selector.unregister(fileobj)

    def call_later(self, delay: float, callback: Callable[[], object]) -> None:
        """Run ``callback()`` in the loop's thread after ``delay`` seconds; its result is ignored."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), callback))

    def next_timer(self) -> Optional[float]:
        """Return when the earliest timer is due (time.monotonic()), or None."""
        return self._timers[0][0] if self._timers else None

    def run_once(self, timeout: float, busy_poll: float = 0.0) -> None:
        """Wait up to ``timeout`` seconds for events; run their callbacks and the due timers.

        With ``busy_poll``, poll without sleeping for up to that many seconds
        first, and sleep only if nothing arrived by then.
        """
        select = self.selector.select
        if busy_poll and timeout > 0:
            deadline = time.perf_counter() + busy_poll
            events = select(0)
            while not events and time.perf_counter() < deadline:
                events = select(0)
            if not events:
                events = select(timeout)
        else:
            events = select(timeout)
        for key, mask in events:
            key.data(key.fileobj, mask)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    def wake(self) -> None:
        """Make the loop call on_wake(); safe from any thread."""
        try:
            self._wake_write.send(_WAKE_BYTE)
        except OSError:
            # A full buffer already holds a wake-up; a closed one means stopped.
            pass

    def install_signal_handlers(self, signums: Iterable[int]) -> Callable[[], None]:
        """Deliver these signals to on_signal(); return a function that restores the old handlers.

        Does nothing outside the main thread, where Python allows no handler.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        previous = {signum: signal.getsignal(signum) for signum in signums}
        # The C-level handler writes the signal number to the wake-up fd, so the
        # Python-level handler has nothing left to do.
        for signum in previous:
            signal.signal(signum, lambda signum, frame: None)
        previous_wakeup_fd = signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(previous_wakeup_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    def close(self) -> None:
        self.selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _handle_wake(self, sock: socket.socket, mask: int) -> None:
        try:
            data = self._wake_read.recv(4096)
        except BlockingIOError:
            return
        for value in data:
            if value == 0:
                self._on_wake()
            else:
                self._on_signal(value)
