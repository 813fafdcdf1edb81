"""The benchmark cells and the servers that run them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

KIB = 1024
MIB = 1024 * 1024

# "gaspar" runs with default options, which the targets judge.
# "gaspar-prefetch4" shows what queueing requests at busy workers gains.
SERVER_NAMES = ("gaspar", "gaspar-prefetch4", "asyncio-pool", "python-inline", "c-echo")
GASPAR_SERVERS = ("gaspar", "gaspar-prefetch4")
SERVER_TITLES = {
    "gaspar": "gaspar",
    "gaspar-prefetch4": "gaspar, prefetch 4",
    "asyncio-pool": "asyncio + ProcessPoolExecutor",
    "python-inline": "Python inline (selectors, 1 thread)",
    "c-echo": "C inline echo (epoll, 1 thread)",
}
# Servers that can run any handler; c-echo can only echo.
ANY_HANDLER_SERVERS = ("gaspar", "gaspar-prefetch4", "asyncio-pool", "python-inline")

# Target time of one CPU-bound request, in seconds.
CPU_BOUND_SECONDS = 0.002


@dataclass(frozen=True)
class Cell:
    """One load shape: a handler, a payload size and a number of concurrent connections."""

    name: str
    handler: str  # "echo" or "sha256", as in benchmarks.handlers.build_handler()
    payload_size: int
    connections: int
    title: str

    @property
    def servers(self) -> Tuple[str, ...]:
        return SERVER_NAMES if self.handler == "echo" else ANY_HANDLER_SERVERS


LOAD_CELLS: Tuple[Cell, ...] = (
    Cell("echo-16B-1", "echo", 16, 1, "echo, 16 B, 1 connection"),
    Cell("echo-16B-32", "echo", 16, 32, "echo, 16 B, 32 connections"),
    Cell("echo-16B-256", "echo", 16, 256, "echo, 16 B, 256 connections"),
    Cell("cpu-2ms-1", "sha256", 16, 1, "CPU-bound handler of about 2 ms, 1 connection"),
    Cell("cpu-2ms-8", "sha256", 16, 8, "CPU-bound handler of about 2 ms, 8 connections"),
    Cell("echo-1MiB-4", "echo", MIB, 4, "echo, 1 MiB, 4 connections"),
    Cell("echo-16MiB-2", "echo", 16 * MIB, 2, "echo, 16 MiB, 2 connections"),
)
CELLS_BY_NAME: Dict[str, Cell] = {cell.name: cell for cell in LOAD_CELLS}

# Requests in a row against gaspar, and the request shape, of the long-run cell.
LONG_RUN = "long-run"
LONG_RUN_CELL = Cell(LONG_RUN, "echo", 16, 32, "echo, 16 B, 32 connections, requests in a row")
LONG_RUN_REQUESTS = 200_000
LONG_RUN_QUICK_REQUESTS = 20_000
# Requests in each of the two windows compared; shorter runs use half their length.
LONG_RUN_WINDOW = 10_000

FRAMING = "framing"
# The case of benchmarks/framing_bench.py that the framing target reads.
FRAMING_CASE = "parse 10,000 16 B frames, 1 feed"

ALL_CELL_NAMES: Tuple[str, ...] = tuple(CELLS_BY_NAME) + (LONG_RUN, FRAMING)
