"""Write the results: RESULTS.md, results.json and the results.png chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks.cells import CELLS_BY_NAME, GASPAR_SERVERS, LONG_RUN_CELL, SERVER_NAMES, SERVER_TITLES
from benchmarks.stats import Target, ratio

# A run whose load generator used more than this share of one core may have
# been limited by the generator rather than by the server.
GENERATOR_BUSY_FRACTION = 0.9


def format_significant(value: Optional[float], digits: int = 3) -> str:
    """Format a number with about ``digits`` significant digits and thousands separators, never in exponent form."""
    if value is None or math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def format_rate(summary: dict) -> str:
    median = format_significant(summary["requests_per_second"])
    low = format_significant(summary["requests_per_second_min"])
    high = format_significant(summary["requests_per_second_max"])
    return median if summary["runs"] - summary["failed_runs"] <= 1 else f"{median} ({low}–{high})"


def format_ms(microseconds: float) -> str:
    return format_significant(microseconds / 1000 if microseconds is not None else None)


def format_mib(kib: float) -> str:
    return "-" if kib is None or math.isnan(kib) else f"{kib / 1024:.1f}"


def format_run_line(index: int, total: int, run: dict) -> str:
    """Return the one-line progress report of a finished run."""
    prefix = f"[{index}/{total}] {run['cell']} #{run['repeat']} {run['server']}:"
    if run["failure"] is not None:
        return f"{prefix} FAILED: {run['failure'].splitlines()[0]}"
    latency = run["latency_us"]
    errors = run["error_total"] + run["warmup_errors"]
    return (
        f"{prefix} {format_significant(run['requests_per_second'])} req/s, "
        f"p50 {format_ms(latency['p50'])} ms, p99 {format_ms(latency['p99'])} ms, "
        f"errors {errors}, server CPU {format_significant(run['server_cpu_us_per_request'])} µs/req, "
        f"generator CPU {run['generator_cpu_fraction']:.0%}"
    )


CELL_TABLE_HEADER = (
    "| server | req/s, median (min–max) | p50 ms | p99 ms | p99.9 ms | max ms | errors "
    "| server CPU µs/req | all-process CPU µs/req | server peak RSS MiB | all-process RSS MiB | generator CPU |"
)


COLUMN_NOTES = [
    "## Columns",
    "",
    "- req/s and latencies: medians over the repeats; max ms is the maximum over them. Latency runs from "
    "the client's socket() to the server's FIN, as the load generator sees it.",
    "- server CPU: user plus system CPU seconds of the server process alone, from /proc/PID/stat before "
    "and after the measured load, per successful request. For gaspar that is the producer process only; "
    "the fork server and the workers are excluded. For asyncio + ProcessPoolExecutor it is the event-loop "
    "process only.",
    "- all-process CPU: the same for the server process and every descendant (gaspar's fork server and "
    "workers, the process pool).",
    "- server peak RSS: VmHWM of the server process, a fresh process for each run. all-process RSS: "
    "the sum of VmRSS over the server process and its descendants at the end of the run, so pages "
    "shared after fork() count once per process.",
    "- generator CPU: CPU time of the load generator over the run's wall time; \"busy\" above "
    f"{GENERATOR_BUSY_FRACTION:.0%} means the generator may have limited that run.",
]


def cell_table(servers: Dict[str, dict], skipped: Sequence[str] = ()) -> List[str]:
    """Return the Markdown table rows of one cell, one row per server."""
    lines = [CELL_TABLE_HEADER, "|" + "---|" * 12]
    for name in SERVER_NAMES:
        if name in skipped:
            lines.append(f"| {SERVER_TITLES[name]} | skipped: it only echoes |" + " |" * 10)
            continue
        summary = servers.get(name)
        if summary is None:
            continue
        if summary["failed_runs"] == summary["runs"]:
            lines.append(f"| {SERVER_TITLES[name]} | every run failed |" + " |" * 10)
            continue
        busy = summary["generator_cpu_fraction"]
        if math.isnan(busy):
            busy_text = "-"
        elif busy > GENERATOR_BUSY_FRACTION:
            busy_text = f"{busy:.0%} (busy)"
        else:
            busy_text = f"{busy:.0%}"
        failed = f", {summary['failed_runs']} failed runs" if summary["failed_runs"] else ""
        lines.append(
            f"| {SERVER_TITLES[name]} | {format_rate(summary)} | {format_ms(summary['p50_us'])} "
            f"| {format_ms(summary['p99_us'])} | {format_ms(summary['p99.9_us'])} | {format_ms(summary['max_us'])} "
            f"| {summary['errors']}{failed} | {format_significant(summary['server_cpu_us_per_request'])} "
            f"| {format_significant(summary['tree_cpu_us_per_request'])} | {format_mib(summary['server_peak_rss_kib'])} "
            f"| {format_mib(summary['tree_rss_kib'])} | {busy_text} |"
        )
    return lines


def ratio_lines(servers: Dict[str, dict]) -> List[str]:
    """Return "GASPAR / PEER" lines for each gaspar server and each peer: throughput and latency ratios.

    Above 1 means gaspar is higher.
    """
    lines = []
    for name in GASPAR_SERVERS:
        gaspar = servers.get(name)
        if gaspar is None:
            continue
        for peer in SERVER_NAMES:
            other = servers.get(peer)
            if peer in GASPAR_SERVERS or other is None:
                continue
            parts = []
            for label, key in (("req/s", "requests_per_second"), ("p50", "p50_us"), ("p99", "p99_us")):
                value = ratio(gaspar[key], other[key])
                parts.append(f"{label} {'-' if math.isnan(value) else f'{value:.2f}x'}")
            lines.append(f"{SERVER_TITLES[name]} / {SERVER_TITLES[peer]}: " + ", ".join(parts))
    return lines


def targets_table(targets: List[Target]) -> List[str]:
    lines = ["| subject | target | measured | result |", "|---|---|---|---|"]
    for target in targets:
        if target.met is None:
            result = "not measured"
        elif target.met:
            result = "met"
        else:
            result = "missed"
        lines.append(f"| {target.subject} | {target.requirement} | {target.measured} | {result} |")
    return lines


def long_run_lines(long_run: dict) -> List[str]:
    if long_run.get("failure"):
        return [f"The long run failed: {long_run['failure']}"]
    lines = [
        f"{long_run['completed']:,} of {long_run['requests']:,} requests completed against gaspar "
        f"({LONG_RUN_CELL.title}) at {format_significant(long_run['requests_per_second'])} req/s, "
        f"p50 {format_ms(long_run['latency_us']['p50'])} ms, p99 {format_ms(long_run['latency_us']['p99'])} ms, "
        f"max {format_ms(long_run['latency_us']['max'])} ms, {long_run['error_total']} errors.",
        "",
        "| window | requests | producer CPU µs/req | producer RSS MiB at its end | all-process RSS MiB at its end |",
        "|---|---|---|---|---|",
    ]
    for label, key in (("first", "first_window"), ("last", "last_window")):
        window = long_run[key]
        lines.append(
            f"| {label} | {window['start']:,}–{window['end']:,} | {window['cpu_us_per_request']:.1f} "
            f"| {format_mib(window['rss_kib'])} | {format_mib(window['tree_rss_kib'])} |"
        )
    return lines


def framing_lines(framing: dict) -> List[str]:
    if framing.get("failure"):
        return [f"The framing case failed: {framing['failure']}"]
    c_text = "not built" if framing["c_seconds"] is None else f"{framing['c_seconds'] * 1e6:,.1f} µs"
    speedup = framing.get("speedup", math.nan)
    return [
        f"`{framing['case']}` from benchmarks/framing_bench.py, best of {framing['repeats']} timeit repeats: "
        f"Python twin {framing['python_seconds'] * 1e6:,.1f} µs, C core {c_text}, "
        f"speedup {'-' if math.isnan(speedup) else f'{speedup:.1f}x'}."
    ]


def write_markdown(path: Path, results: dict, targets: List[Target]) -> None:
    """Write RESULTS.md: the machine, the targets, then one section per cell."""
    machine = results["machine"]
    settings = results["settings"]
    lines = [
        "# gaspar benchmark results",
        "",
        f"Written by `{results['command']}` on {results['date']}. See benchmarks/README.md for what each "
        "server and cell is and how the numbers are measured.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {machine['cpu_model']} |",
        f"| cores | {machine['cores']} online, {machine['usable_cores']} usable by this process |",
        f"| load average at start | {machine['load_average']} |",
        f"| Python | {machine['python']} |",
        f"| pyzmq / libzmq | {machine['pyzmq']} / {machine['libzmq']} |",
        f"| gaspar | {machine['gaspar']}, framing implementation: {machine['framing']} |",
        f"| C compiler | {machine['compiler']} |",
        f"| settings | {settings['duration']} s per run after {settings['warmup']} s of warm-up, "
        f"{settings['repeats']} repeat(s), {settings['workers']} worker(s) |",
        f"| CPU-bound handler | {settings['rounds']:,} SHA-256 rounds: {settings['handler_seconds'] * 1000:.2f} ms "
        f"per call, the median of 25 calls in the harness process (fastest "
        f"{settings['handler_fastest_seconds'] * 1000:.2f} ms) |",
    ]
    ceiling = results.get("generator_ceiling")
    if ceiling:
        lines.append(
            f"| load generator ceiling | {format_significant(ceiling['requests_per_second'])} req/s, "
            f"against the C echo server in {ceiling['cell']} |"
        )
    lines += ["", "## Targets", "", *targets_table(targets), "", *COLUMN_NOTES, ""]

    summaries = results["summaries"]
    for cell_name, servers in summaries.items():
        cell = CELLS_BY_NAME[cell_name]
        skipped = [name for name in SERVER_NAMES if name not in cell.servers]
        lines += [f"## {cell.name}: {cell.title}", "", *cell_table(servers, skipped), ""]
        lines += [f"- {line}" for line in ratio_lines(servers)]
        lines.append("")
    if results.get("long_run"):
        lines += ["## long-run: requests in a row against gaspar", "", *long_run_lines(results["long_run"]), ""]
    if results.get("framing"):
        lines += ["## framing", "", *framing_lines(results["framing"]), ""]
    if results.get("chart"):
        lines += ["## Chart", "", f"![throughput and p99 latency per cell]({results['chart']})", ""]
    path.write_text("\n".join(lines))


def write_json(path: Path, results: dict) -> None:
    """Write every run and summary as JSON, NaN written as null."""

    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        return value

    path.write_text(json.dumps(clean(results), indent=2) + "\n")


def write_chart(path: Path, summaries: Dict[str, Dict[str, dict]]) -> Optional[str]:
    """Draw throughput and p99 latency per cell and server into a PNG.

    Returns None on success, or why no chart was drawn.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError as error:
        return f"matplotlib is not installed ({error}); install the bench extra: pip install '.[bench]'"
    if not summaries:
        return "no load cell ran"

    cells = list(summaries)
    figure, (rate_axes, latency_axes) = pyplot.subplots(2, 1, figsize=(max(8, 1.6 * len(cells)), 9))
    width = 0.8 / len(SERVER_NAMES)
    for offset, server in enumerate(SERVER_NAMES):
        positions, rates, rate_errors, latencies, latency_errors = [], [], [[], []], [], [[], []]
        for index, cell in enumerate(cells):
            summary = summaries[cell].get(server)
            if summary is None or math.isnan(summary["requests_per_second"]):
                continue
            positions.append(index + (offset - (len(SERVER_NAMES) - 1) / 2) * width)
            rates.append(summary["requests_per_second"])
            rate_errors[0].append(summary["requests_per_second"] - summary["requests_per_second_min"])
            rate_errors[1].append(summary["requests_per_second_max"] - summary["requests_per_second"])
            latencies.append(summary["p99_us"] / 1000)
            latency_errors[0].append((summary["p99_us"] - summary["p99_us_min"]) / 1000)
            latency_errors[1].append((summary["p99_us_max"] - summary["p99_us"]) / 1000)
        if not positions:
            continue
        label = SERVER_TITLES[server]
        rate_axes.bar(positions, rates, width, yerr=rate_errors, label=label, capsize=2)
        latency_axes.bar(positions, latencies, width, yerr=latency_errors, label=label, capsize=2)

    for axes, title in (
        (rate_axes, "throughput, req/s (median of repeats, bars show min–max)"),
        (latency_axes, "p99 latency, ms (median of repeats, bars show min–max)"),
    ):
        axes.set_yscale("log")
        axes.set_xticks(range(len(cells)))
        axes.set_xticklabels(cells)
        axes.set_title(title)
        axes.grid(axis="y", which="both", alpha=0.3)
    rate_axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return None
