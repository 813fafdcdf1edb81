"""Micro-benchmark of framing: the C core gaspar._framing against the Python twin.

Run from the repository root, after building the extension with
``python setup.py build_ext --inplace``::

    python -m benchmarks.framing_bench           # about 25 s
    python -m benchmarks.framing_bench --quick   # about 1 s, a smoke test

Each case reports the best of several timeit repeats, as time per operation
or as payload throughput in MB/s (10**6 bytes per second), and the speedup of
the C core over the Python twin. Without a built C core only the twin runs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from gaspar import _framing_py


@dataclass(frozen=True)
class Case:
    """One benchmark: ``make(module)`` returns the operation to time."""

    name: str
    make: Callable[[ModuleType], Callable[[], object]]
    # Payload bytes one operation handles, to report MB/s. None reports µs per operation.
    payload_bytes: int | None = None


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def make_pack(size: int):
    def make(module):
        payload = b"x" * size
        pack = module.pack
        return lambda: pack(payload)

    return make


def make_unpack_header(module):
    header = frame(b"x" * 16)
    unpack_header = module.unpack_header
    return lambda: unpack_header(header)


def make_chunked_feed(frame_size: int, chunk_size: int):
    """Time parsing one frame of ``frame_size`` payload bytes fed in ``chunk_size`` pieces."""

    def make(module):
        stream = frame(b"x" * frame_size)
        chunks = [stream[start : start + chunk_size] for start in range(0, len(stream), chunk_size)]
        parser_class = module.FrameParser

        def run():
            parser = parser_class()
            for chunk in chunks:
                parser.feed(chunk)
            return parser.next_frame()

        return run

    return make


def make_many_frames(count: int, size: int):
    """Time parsing ``count`` frames of ``size`` payload bytes from one buffer."""

    def make(module):
        stream = frame(b"x" * size) * count
        parser_class = module.FrameParser

        def run():
            parser = parser_class()
            parser.feed(stream)
            return list(parser)

        return run

    return make


CASES = [
    Case("pack, 16 B", make_pack(16)),
    Case("pack, 64 KiB", make_pack(64 * 1024), payload_bytes=64 * 1024),
    Case("unpack_header", make_unpack_header),
    Case("parse 4 KiB frame, 1 B chunks", make_chunked_feed(4096, 1), payload_bytes=4096),
    Case("parse 1 MiB frame, 4 KiB chunks", make_chunked_feed(1024 * 1024, 4096), payload_bytes=1024 * 1024),
    Case("parse 10,000 16 B frames, 1 feed", make_many_frames(10_000, 16)),
]


def time_operation(operation: Callable[[], object], repeats: int, min_run_seconds: float) -> float:
    """Return the best seconds per call of ``operation`` over ``repeats`` timed runs."""
    timer = timeit.Timer(operation)
    calls = 1
    while timer.timeit(calls) < min_run_seconds:
        calls *= 2
    return min(timer.repeat(repeat=repeats, number=calls)) / calls


def format_result(case: Case, seconds: float | None) -> str:
    if seconds is None:
        return "not built"
    if case.payload_bytes is None:
        return f"{seconds * 1e6:.3f} µs/op"
    return f"{case.payload_bytes / seconds / 1e6:.1f} MB/s"


def load_c_core() -> ModuleType | None:
    try:
        from gaspar import _framing
    except ImportError as error:
        print(f"C core gaspar._framing not built ({error}), timing the Python twin only.")
        print("Build it with `python setup.py build_ext --inplace`.")
        return None
    return _framing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="time each run for at least 5 ms in 2 repeats (under 1 s in all) instead of 0.2 s in 5",
    )
    options = parser.parse_args(argv)
    repeats, min_run_seconds = (2, 0.005) if options.quick else (5, 0.2)

    print(f"Python {platform.python_version()} ({platform.python_implementation()}), {platform.machine()}")
    print(f"best of {repeats} timeit repeats, each at least {min_run_seconds * 1000:g} ms")
    c_core = load_c_core()
    print()
    print(f"{'case':<34} {'python':>14} {'c':>14} {'speedup':>8}")

    for case in CASES:
        python_seconds = time_operation(case.make(_framing_py), repeats, min_run_seconds)
        c_seconds = None
        speedup = "-"
        if c_core is not None:
            c_seconds = time_operation(case.make(c_core), repeats, min_run_seconds)
            speedup = f"{python_seconds / c_seconds:.1f}x"
        print(
            f"{case.name:<34} {format_result(case, python_seconds):>14} "
            f"{format_result(case, c_seconds):>14} {speedup:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
