"""The benchmark harness behind ``python -m benchmarks``: runs every cell and writes the report.

Each run starts a fresh server process, warms it up, measures one load
generator run against it and stops it, so every run gets a clean process and
its own peak RSS. Runs go server after server within each repeat of a cell
(A B C D A B C D ...), so slow drifts of a shared machine show up as spread
between repeats instead of favouring one server.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import native, procfs, report, runner, stats
from benchmarks.cells import (
    ALL_CELL_NAMES,
    CELLS_BY_NAME,
    CPU_BOUND_SECONDS,
    FRAMING,
    FRAMING_CASE,
    LONG_RUN,
    LONG_RUN_CELL,
    LONG_RUN_QUICK_REQUESTS,
    LONG_RUN_REQUESTS,
    LONG_RUN_WINDOW,
    SERVER_NAMES,
    Cell,
)
from benchmarks.handlers import build_handler, calibrate_rounds, measure_handler_seconds

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPOSITORY_ROOT = BENCHMARKS_DIR.parent

FULL_DURATION_SECONDS = 5.0
QUICK_DURATION_SECONDS = 1.0
FULL_WARMUP_SECONDS = 0.5
QUICK_WARMUP_SECONDS = 0.2
FULL_REPEATS = 3
# Seconds one request may take before the load generator counts it as timed out.
REQUEST_TIMEOUT_SECONDS = 10.0
# Requests one measured run may start; the duration normally ends a run first.
MAX_REQUESTS_PER_RUN = 10_000_000
# Time limit of the long-run cell; it stops there even if requests remain.
LONG_RUN_MAX_SECONDS = 900.0


def parse_arguments(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark gaspar against asyncio + ProcessPoolExecutor, a Python inline server and a "
        "C echo server on this machine, and write RESULTS.md and results.png.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_DURATION_SECONDS:g} s per run, 1 repeat, "
        f"{LONG_RUN_QUICK_REQUESTS:,} requests in the long run, short framing timings",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds of measured load per run (default: {FULL_DURATION_SECONDS:g}, "
        f"{QUICK_DURATION_SECONDS:g} with --quick)",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"runs of each server in each cell (default: {FULL_REPEATS}, 1 with --quick)"
    )
    parser.add_argument(
        "--cells",
        default=",".join(ALL_CELL_NAMES),
        help="comma-separated cells to run, from: " + ", ".join(ALL_CELL_NAMES) + " (default: all)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes of gaspar and of the process pool (default: 2)"
    )
    parser.add_argument(
        "--long-run-requests",
        type=int,
        help=f"requests of the long-run cell (default: {LONG_RUN_REQUESTS:,}, {LONG_RUN_QUICK_REQUESTS:,} with --quick)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=BENCHMARKS_DIR,
        help="directory for RESULTS.md, results.json and results.png (default: the benchmarks directory)",
    )
    arguments = parser.parse_args(argv)

    if arguments.duration is None:
        arguments.duration = QUICK_DURATION_SECONDS if arguments.quick else FULL_DURATION_SECONDS
    if arguments.repeats is None:
        arguments.repeats = 1 if arguments.quick else FULL_REPEATS
    if arguments.long_run_requests is None:
        arguments.long_run_requests = LONG_RUN_QUICK_REQUESTS if arguments.quick else LONG_RUN_REQUESTS
    arguments.warmup = QUICK_WARMUP_SECONDS if arguments.quick else FULL_WARMUP_SECONDS

    if not arguments.duration > 0:
        parser.error(f"--duration must be a positive number of seconds, got {arguments.duration}")
    if arguments.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {arguments.repeats}")
    if arguments.workers < 1:
        parser.error(f"--workers must be at least 1, got {arguments.workers}")
    if arguments.long_run_requests < 2:
        parser.error(f"--long-run-requests must be at least 2, got {arguments.long_run_requests}")
    selected = [name.strip() for name in arguments.cells.split(",") if name.strip()]
    unknown = [name for name in selected if name not in ALL_CELL_NAMES]
    if unknown or not selected:
        parser.error(f"invalid --cells {arguments.cells!r}; choose from {', '.join(ALL_CELL_NAMES)}")
    # Keep the documented order whatever order the names were given in.
    arguments.cells = [name for name in ALL_CELL_NAMES if name in selected]
    return arguments


def describe_machine(compiler: str) -> Dict[str, str]:
    """Return the facts RESULTS.md records about the machine and the software under test."""
    import zmq

    import gaspar
    from gaspar import framing

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "cpu_model": cpu_model,
        "cores": str(os.cpu_count()),
        "usable_cores": str(len(os.sched_getaffinity(0))),
        "load_average": f"{load} (1, 5, 15 min)",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "gaspar": f"{gaspar.__version__} from {Path(gaspar.__file__).parent}",
        "framing": framing.IMPLEMENTATION,
        "compiler": native.compiler_version(compiler),
    }


def child_environment() -> Dict[str, str]:
    """Return an environment in which server processes import this benchmarks package and this gaspar."""
    import gaspar

    gaspar_parent = str(Path(gaspar.__file__).resolve().parent.parent)
    env = dict(os.environ)
    # The gaspar this process imported goes first, so the servers measure the same build.
    paths = [gaspar_parent, str(REPOSITORY_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path for path in paths if path))
    return env


class Harness:
    """Runs the selected cells and collects every run's record."""

    def __init__(self, options: argparse.Namespace, tools: native.NativeTools, work_dir: Path, rounds: int):
        self.options = options
        self.tools = tools
        self.work_dir = work_dir
        self.rounds = rounds
        self.env = child_environment()
        self.runs: List[dict] = []
        self.failed = False

    # -- servers and payloads ------------------------------------------------

    def server(self, name: str, cell: Cell, label: str) -> runner.ServerProcess:
        log_path = self.work_dir / f"{label}.log"
        if name == "c-echo":
            return runner.ServerProcess(name, [str(self.tools.echo_server)], log_path)
        command = [
            sys.executable, "-m", "benchmarks.servers", name,
            "--handler", cell.handler,
            "--rounds", str(self.rounds),
            "--workers", str(self.options.workers),
        ]  # fmt: skip
        return runner.ServerProcess(name, command, log_path, env=self.env)

    def payload_files(self, cell: Cell):
        """Write the cell's framed request and expected reply; return (payload, reply, request path, reply path)."""
        payload = random.Random(cell.payload_size).randbytes(cell.payload_size)
        reply = build_handler(cell.handler, self.rounds)(payload)
        request_path = self.work_dir / f"{cell.name}.request"
        expected_path = self.work_dir / f"{cell.name}.expected"
        request_path.write_bytes(runner.frame(payload))
        expected_path.write_bytes(reply)
        return payload, reply, request_path, expected_path

    # -- load cells ------------------------------------------------------------

    def run_load_cells(self, cells: List[Cell]) -> None:
        plan = [
            (cell, repeat, server)
            for cell in cells
            for repeat in range(1, self.options.repeats + 1)
            for server in cell.servers
        ]
        files = {}
        for index, (cell, repeat, server) in enumerate(plan, start=1):
            if cell.name not in files:
                files[cell.name] = self.payload_files(cell)
                skipped = [name for name in SERVER_NAMES if name not in cell.servers]
                if skipped:
                    print(f"{cell.name}: skipping {', '.join(skipped)}: it only echoes", flush=True)
            record = self.measure(cell, repeat, server, *files[cell.name])
            self.runs.append(record)
            print(report.format_run_line(index, len(plan), record), flush=True)
            if index == len(plan) or plan[index][0] is not cell:
                self.print_cell_ratios(cell)

    def print_cell_ratios(self, cell: Cell) -> None:
        servers = summarize([run for run in self.runs if run["cell"] == cell.name]).get(cell.name, {})
        for line in report.ratio_lines(servers):
            print(f"  {cell.name}: {line}", flush=True)

    def measure(self, cell: Cell, repeat: int, name: str, payload, reply, request_path, expected_path) -> dict:
        """Start one server, warm it up, measure one load run against it and stop it."""
        record = {"cell": cell.name, "server": name, "repeat": repeat, "failure": None, "warmup_errors": 0}
        server = self.server(name, cell, f"{cell.name}-{repeat}-{name}")
        try:
            server.start(probe_request=payload, probe_reply=reply)
            spec = runner.LoadSpec(
                port=server.port,
                connections=cell.connections,
                max_requests=MAX_REQUESTS_PER_RUN,
                max_seconds=self.options.warmup,
                request_timeout=REQUEST_TIMEOUT_SECONDS,
                request_path=request_path,
                expected_path=expected_path,
            )
            warmup = runner.run_load(self.tools.loadgen, spec, self.work_dir)
            record["warmup_errors"] = warmup.error_count

            cpu_before = procfs.cpu_seconds(server.pid)
            tree_before = procfs.tree_cpu_seconds(server.pid)
            spec.max_seconds = self.options.duration
            load = runner.run_load(self.tools.loadgen, spec, self.work_dir)
            cpu_after = procfs.cpu_seconds(server.pid)
            tree_after = procfs.tree_cpu_seconds(server.pid)
            peak_rss = procfs.memory_kib(server.pid, "VmHWM")
            tree_rss = procfs.tree_rss_kib(server.pid)
            if server.exit_status() is not None:
                raise runner.RunFailed(f"{name} exited with status {server.exit_status()} during the run")
        except (runner.RunFailed, OSError) as exc:
            record["failure"] = str(exc)
            self.failed = True
            return record
        finally:
            server.stop()

        completed = load.completed
        per_request = 1e6 / completed if completed else math.nan
        record.update(
            completed=completed,
            errors=load.errors,
            error_total=load.error_count,
            elapsed_s=load.elapsed_seconds,
            requests_per_second=completed / load.elapsed_seconds if load.elapsed_seconds > 0 else math.nan,
            latency_us=stats.latency_summary(load.latencies_us),
            server_cpu_us_per_request=(cpu_after - cpu_before) * per_request,
            tree_cpu_us_per_request=procfs.tree_cpu_delta(tree_before, tree_after) * per_request,
            server_peak_rss_kib=peak_rss,
            tree_rss_kib=tree_rss,
            generator_cpu_fraction=load.cpu_seconds / load.elapsed_seconds if load.elapsed_seconds > 0 else math.nan,
        )
        return record

    # -- long run ----------------------------------------------------------------

    def run_long(self) -> dict:
        """Send the long-run requests in a row to one gaspar; sample the producer around two windows."""
        requests = self.options.long_run_requests
        window = min(LONG_RUN_WINDOW, requests // 2)
        cell = LONG_RUN_CELL
        payload, reply, request_path, expected_path = self.payload_files(cell)
        result: dict = {"requests": requests, "window": window, "failure": None}
        server = self.server("gaspar", cell, "long-run-gaspar")
        print(f"long run: {requests:,} requests against gaspar, {cell.connections} connections", flush=True)

        samples: List[dict] = []

        def sample(completed: int) -> None:
            if 0 < completed < requests:
                print(f"  long run: sampling the producer at request {completed:,}", flush=True)
            samples.append(
                {
                    "completed": completed,
                    "cpu_seconds": procfs.cpu_seconds(server.pid),
                    "rss_kib": procfs.memory_kib(server.pid, "VmRSS"),
                    "tree_rss_kib": procfs.tree_rss_kib(server.pid),
                }
            )

        try:
            server.start(probe_request=payload, probe_reply=reply)
            spec = runner.LoadSpec(
                port=server.port,
                connections=cell.connections,
                max_requests=requests,
                max_seconds=LONG_RUN_MAX_SECONDS,
                request_timeout=REQUEST_TIMEOUT_SECONDS,
                request_path=request_path,
                expected_path=expected_path,
                pause_at=sorted({window, requests - window}),
            )
            sample(0)
            load = runner.run_load(self.tools.loadgen, spec, self.work_dir, on_checkpoint=sample)
            sample(load.completed)
            if server.exit_status() is not None:
                raise runner.RunFailed(f"gaspar exited with status {server.exit_status()} during the long run")
        except (runner.RunFailed, OSError) as exc:
            result["failure"] = str(exc)
            self.failed = True
            return result
        finally:
            server.stop()

        if load.completed + load.error_count < requests:
            result["failure"] = (
                f"only {load.completed + load.error_count:,} of {requests:,} requests ran within "
                f"{LONG_RUN_MAX_SECONDS:g} s"
            )
            self.failed = True
            return result

        if len(samples) != len(spec.pause_at) + 2:
            result["failure"] = f"the load generator stopped at {len(samples) - 2} of {len(spec.pause_at)} checkpoints"
            self.failed = True
            return result
        # With the windows touching (short runs), the middle sample ends one and starts the other.
        first_end = samples[1]
        last_start = samples[-2]
        result.update(
            completed=load.completed,
            errors=load.errors,
            error_total=load.error_count,
            requests_per_second=load.completed / load.elapsed_seconds if load.elapsed_seconds > 0 else math.nan,
            latency_us=stats.latency_summary(load.latencies_us),
            samples=samples,
            first_window=_window(samples[0], first_end),
            last_window=_window(last_start, samples[-1]),
        )
        return result

    # -- framing -----------------------------------------------------------------

    def run_framing(self) -> dict:
        """Time framing_bench's many-small-frames case on the Python twin and on the C core."""
        from benchmarks import framing_bench
        from gaspar import _framing_py

        repeats, min_run_seconds = (2, 0.005) if self.options.quick else (5, 0.2)
        result: dict = {"case": FRAMING_CASE, "repeats": repeats, "failure": None}
        cases = {case.name: case for case in framing_bench.CASES}
        case = cases.get(FRAMING_CASE)
        if case is None:
            result["failure"] = f"benchmarks/framing_bench.py has no case named {FRAMING_CASE!r}"
            self.failed = True
            return result

        print(f"framing: {FRAMING_CASE}", flush=True)
        python_seconds = framing_bench.time_operation(case.make(_framing_py), repeats, min_run_seconds)
        c_core = framing_bench.load_c_core()
        c_seconds = None
        if c_core is not None:
            c_seconds = framing_bench.time_operation(case.make(c_core), repeats, min_run_seconds)
        result.update(
            python_seconds=python_seconds,
            c_seconds=c_seconds,
            speedup=python_seconds / c_seconds if c_seconds else math.nan,
        )
        return result


def _window(start: dict, end: dict) -> dict:
    count = end["completed"] - start["completed"]
    cpu = end["cpu_seconds"] - start["cpu_seconds"]
    return {
        "start": start["completed"],
        "end": end["completed"],
        "cpu_us_per_request": cpu / count * 1e6 if count > 0 else math.nan,
        "rss_kib": end["rss_kib"],
        "tree_rss_kib": end["tree_rss_kib"],
    }


def summarize(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Return summaries by cell, then by server, in run order."""
    grouped: Dict[str, Dict[str, List[dict]]] = {}
    for run in runs:
        grouped.setdefault(run["cell"], {}).setdefault(run["server"], []).append(run)
    return {
        cell: {server: stats.summarize_runs(server_runs) for server, server_runs in servers.items()}
        for cell, servers in grouped.items()
    }


def generator_ceiling(summaries: Dict[str, Dict[str, dict]]) -> Optional[dict]:
    """Return the fastest 16 B echo cell of the C echo server: the most the generator was shown to drive."""
    best = None
    for cell_name in ("echo-16B-1", "echo-16B-32", "echo-16B-256"):
        summary = summaries.get(cell_name, {}).get("c-echo")
        if summary is None or math.isnan(summary["requests_per_second"]):
            continue
        if best is None or summary["requests_per_second"] > best["requests_per_second"]:
            best = {"cell": cell_name, "requests_per_second": summary["requests_per_second"]}
    return best


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _raise_system_exit(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so every finally block stops its server.
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_arguments(argv)
    command_args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _raise_system_exit)
    options.output_dir.mkdir(parents=True, exist_ok=True)

    from gaspar import framing

    if framing.IMPLEMENTATION != "c":
        print(
            "warning: gaspar is using the pure-Python framing; build the C core with "
            "`python setup.py build_ext --inplace` to measure the normal build",
            file=sys.stderr,
        )

    with tempfile.TemporaryDirectory(prefix="gaspar-bench-") as temporary:
        work_dir = Path(temporary)
        try:
            tools = native.build(work_dir / "bin")
        except native.CompilerNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

        rounds = calibrate_rounds(CPU_BOUND_SECONDS)
        handler_fastest_seconds, handler_seconds = measure_handler_seconds(rounds)
        print(
            f"CPU-bound handler: {rounds:,} SHA-256 rounds, {handler_seconds * 1000:.2f} ms per call "
            f"(median; fastest {handler_fastest_seconds * 1000:.2f} ms); "
            f"{options.duration:g} s per run, {plural(options.repeats, 'repeat')}, "
            f"{plural(options.workers, 'worker')}",
            flush=True,
        )
        results = {
            "command": "python -m benchmarks" + (" " + shlex.join(command_args) if command_args else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": describe_machine(tools.compiler),
            "settings": {
                "duration": options.duration,
                "warmup": options.warmup,
                "repeats": options.repeats,
                "workers": options.workers,
                "rounds": rounds,
                "handler_seconds": handler_seconds,
                "handler_fastest_seconds": handler_fastest_seconds,
                "cells": options.cells,
            },
        }

        harness = Harness(options, tools, work_dir, rounds)
        harness.run_load_cells([CELLS_BY_NAME[name] for name in options.cells if name in CELLS_BY_NAME])
        if LONG_RUN in options.cells:
            results["long_run"] = harness.run_long()
        if FRAMING in options.cells:
            results["framing"] = harness.run_framing()

    summaries = summarize(harness.runs)
    results["runs"] = harness.runs
    results["summaries"] = summaries
    results["generator_ceiling"] = generator_ceiling(summaries)
    targets = stats.evaluate_targets(
        summaries, results.get("long_run"), results.get("framing"), options.workers, handler_seconds
    )
    results["targets"] = [target.__dict__ for target in targets]

    chart_path = options.output_dir / "results.png"
    chart_problem = report.write_chart(chart_path, summaries)
    if chart_problem is None:
        results["chart"] = chart_path.name
    else:
        print(f"no chart: {chart_problem}", file=sys.stderr)
    report.write_json(options.output_dir / "results.json", results)
    report.write_markdown(options.output_dir / "RESULTS.md", results, targets)

    print()
    ceiling = results["generator_ceiling"]
    if ceiling:
        print(
            f"load generator ceiling: {report.format_significant(ceiling['requests_per_second'])} req/s "
            f"against the C echo server in {ceiling['cell']}"
        )
    print("\n".join(report.targets_table(targets)))
    print(f"\nwrote {options.output_dir / 'RESULTS.md'}")
    if harness.failed:
        print("error: some runs failed; see FAILED lines above and RESULTS.md", file=sys.stderr)
        return 1
    return 0
