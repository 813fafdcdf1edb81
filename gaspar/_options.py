"""The producer's tunable limits, defined once for Producer, the CLI and GASPAR_* variables.

Each option is a keyword argument of Producer, a ``gaspar serve`` flag with
dashes for underscores, and an environment variable GASPAR_ plus the name in
upper case. An option whose default is None is off unless set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from gaspar._constants import DEFAULT_MAX_REQUEST_SIZE, MAX_FRAME_SIZE


@dataclass(frozen=True)
class Option:
    """One limit: its type, default, allowed range and help text."""

    name: str
    type: type
    default: Any
    minimum: float
    maximum: float
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def environment_variable(self) -> str:
        return "GASPAR_" + self.name.upper()

    def validate(self, value: Any) -> Any:
        """Return ``value`` converted to the option's type; raise TypeError or ValueError naming it."""
        if value is None:
            if self.default is None:
                return None
            raise TypeError(f"{self.name} must not be None")
        if self.type is str:
            if not isinstance(value, str) or not value:
                raise TypeError(f"{self.name} must be a non-empty str, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self.name} must be a number, got {type(value).__name__}")
        if self.type is int and not isinstance(value, int):
            raise TypeError(f"{self.name} must be an int, got {value!r}")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{self.name} must be between {self.minimum} and {self.maximum} {self.metavar.lower()}, got {value}")
        return self.type(value)


_DAY = 86400.0

OPTIONS: Tuple[Option, ...] = (
    Option(
        "max_request_size", int, DEFAULT_MAX_REQUEST_SIZE, 0, MAX_FRAME_SIZE, "BYTES",
        "largest request payload; a larger length prefix is reset before its body is read",
    ),
    Option(
        "read_timeout", float, 30.0, 0.001, _DAY, "SECONDS",
        "time a client has to send its whole request after connecting",
    ),
    Option(
        "write_timeout", float, 30.0, 0.001, _DAY, "SECONDS",
        "time a client may go without reading any of its reply before the connection is reset",
    ),
    Option(
        "timeout", float, None, 0.001, _DAY, "SECONDS",
        "time a handler may run on one request; on expiry its worker is killed and replaced "
        "and the request fails (default: no limit)",
    ),
    Option(
        "max_requests", int, None, 1, 2**62, "N",
        "requests a worker serves before it is replaced (default: no limit)",
    ),
    Option(
        "max_requests_jitter", int, None, 0, 2**62, "N",
        "random extra requests added to each worker's max_requests, so workers do not all "
        "restart at once (default: a tenth of max_requests)",
    ),
    Option(
        "max_worker_memory", int, None, 1, 2**40, "MB",
        "resident memory of a worker, in MiB, checked between requests, above which the "
        "worker is replaced (default: no limit)",
    ),
    Option(
        "max_connections", int, 1024, 1, 2**24, "N",
        "open client connections; beyond it new connections wait in the listen backlog",
    ),
    Option(
        "max_in_flight", int, None, 1, 2**24, "N",
        "requests read but not yet answered; beyond it the producer stops reading new "
        "requests (default: 4 per worker)",
    ),
    Option(
        "graceful_timeout", float, 30.0, 0.0, _DAY, "SECONDS",
        "time requests in flight get to finish after SIGTERM, SIGINT or stop()",
    ),
    Option(
        "startup_timeout", float, 60.0, 0.001, _DAY, "SECONDS",
        "time every worker gets to become ready at start",
    ),
    Option(
        "kill_timeout", float, 10.0, 0.0, _DAY, "SECONDS",
        "time a stopping worker gets to exit after SIGTERM before SIGKILL",
    ),
    Option(
        "prefetch", int, 1, 1, 2**20, "N",
        "requests one worker may hold at once, queued behind the one it runs; with 1 a "
        "request only goes to an idle worker",
    ),
    Option(
        "backlog", int, 1024, 1, 2**20, "N",
        "length of the listening socket's queue of connections not yet accepted",
    ),
    Option(
        "metrics_port", int, None, 0, 65535, "PORT",
        "serve Prometheus metrics at /metrics and a health check at /healthz on this TCP "
        "port; 0 picks a free one (default: off)",
    ),
    Option(
        "metrics_host", str, "127.0.0.1", 0, 0, "HOST",
        "address the metrics endpoint listens on",
    ),
)

OPTIONS_BY_NAME: Dict[str, Option] = {option.name: option for option in OPTIONS}


def resolve_options(given: Dict[str, Any]) -> Dict[str, Any]:
    """Return every option's validated value: those in ``given``, defaults for the rest.

    Raises TypeError for an unknown name, and TypeError or ValueError for a
    bad value, naming it.
    """
    unknown = sorted(set(given) - set(OPTIONS_BY_NAME))
    if unknown:
        raise TypeError(f"unknown Producer option {unknown[0]!r}; known options: {', '.join(OPTIONS_BY_NAME)}")
    values: Dict[str, Any] = {}
    for option in OPTIONS:
        values[option.name] = option.validate(given.get(option.name, option.default))
    return values


def default_text(option: Option) -> Optional[str]:
    """Return the default as the CLI shows it, or None when the option is off by default."""
    return None if option.default is None else str(option.default)
