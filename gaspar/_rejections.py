"""Counting and logging of rejected requests, without a log line per event."""

from __future__ import annotations

import collections
import logging
from typing import Dict

# Causes of failed requests, as logged and counted in Producer.stats().
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


class RejectionLog:
    """Counts rejections per cause and logs them at most once per interval per cause.

    The first rejection of a cause is logged at once with its detail; later
    ones are summed and logged as one line with a count when flush() finds
    ``interval`` seconds have passed since that cause was last logged.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self.totals: collections.Counter[str] = collections.Counter()
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._logged_at: Dict[str, float] = {}

    def record(self, cause: str, detail: str, now: float) -> None:
        """Count one rejection; log it now if it is the first of its cause in a while."""
        self.totals[cause] += 1
        last = self._logged_at.get(cause)
        if last is None or now - last >= self.interval and not self._unlogged[cause]:
            self._logged_at[cause] = now
            self.logger.warning("rejected a request: %s (%s)", cause, detail)
        else:
            self._unlogged[cause] += 1

    def flush(self, now: float, force: bool = False) -> None:
        """Log a count line for each cause with rejections not logged yet, once its interval is over."""
        for cause, count in list(self._unlogged.items()):
            if count and (force or now - self._logged_at[cause] >= self.interval):
                self.logger.warning(
                    "rejected %d more %s: %s (%d in total)",
                    count,
                    "request" if count == 1 else "requests",
                    cause,
                    self.totals[cause],
                )
                self._logged_at[cause] = now
                del self._unlogged[cause]
