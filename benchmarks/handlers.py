"""Request handlers that every benchmarked server runs, and the CPU-bound handler's calibration."""

from __future__ import annotations

import functools
import hashlib
import statistics
import time
from typing import Callable, Tuple

Handler = Callable[[bytes], bytes]

HANDLER_NAMES = ("echo", "sha256")


def echo(payload: bytes) -> bytes:
    """Return the request unchanged."""
    return payload


def sha256_chain(rounds: int, payload: bytes) -> bytes:
    """Return the 32-byte SHA-256 digest of ``payload``, hashed again ``rounds`` times.

    Each round hashes the previous 32-byte digest, so the cost grows with
    ``rounds`` and not with the payload size, and no round can be skipped.
    """
    digest = hashlib.sha256(payload).digest()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest


def build_handler(name: str, rounds: int = 0) -> Handler:
    """Return the handler called ``name``; ``rounds`` sets the sha256 handler's cost.

    A functools.partial of a module-level function is picklable, so the same
    object works in ProcessPoolExecutor and in a forked gaspar worker.
    """
    if name == "echo":
        return echo
    if name == "sha256":
        if rounds < 1:
            raise ValueError(f"the sha256 handler needs rounds >= 1, got {rounds}")
        return functools.partial(sha256_chain, rounds)
    raise ValueError(f"unknown handler {name!r}; expected one of {', '.join(HANDLER_NAMES)}")


def calibrate_rounds(target_seconds: float, payload: bytes = b"\0" * 16, passes: int = 3, calls: int = 15) -> int:
    """Return the sha256_chain round count whose median call takes about ``target_seconds`` here.

    Starts from a short probe, then rescales the count ``passes`` times from
    the median of ``calls`` calls. The median tracks what a call costs on
    this machine as it is loaded now, which on a shared machine can differ
    from the fastest call by half or more.
    """
    probe_rounds = 2000
    sha256_chain(probe_rounds, payload)  # warm up
    rounds = max(1, round(target_seconds / _time_call(probe_rounds, payload) * probe_rounds))
    for _ in range(passes):
        median = statistics.median(_time_call(rounds, payload) for _ in range(calls))
        rounds = max(1, round(rounds * target_seconds / median))
    return rounds


def measure_handler_seconds(rounds: int, payload: bytes = b"\0" * 16, calls: int = 25) -> Tuple[float, float]:
    """Return the fastest and the median seconds of one sha256_chain(rounds) call over ``calls`` calls."""
    timings = [_time_call(rounds, payload) for _ in range(calls)]
    return min(timings), statistics.median(timings)


def _time_call(rounds: int, payload: bytes) -> float:
    start = time.perf_counter()
    sha256_chain(rounds, payload)
    return time.perf_counter() - start
