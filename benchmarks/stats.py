"""Percentiles, summaries over repeats, and the targets that gaspar is measured against."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from benchmarks.cells import SERVER_TITLES

# Percentiles reported for every run; "p99.9" needs at least 1,000 samples to mean anything.
PERCENTILES = {"p50": 50.0, "p99": 99.0, "p99.9": 99.9}


def percentile(sorted_values: Sequence[float], percent: float) -> float:
    """Return the nearest-rank percentile of values sorted in ascending order."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(percent / 100 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def latency_summary(latencies_us: Sequence[int]) -> Dict[str, float]:
    """Return p50, p99, p99.9, max and the sample count of latencies in microseconds."""
    ordered = sorted(latencies_us)
    summary = {name: float(percentile(ordered, percent)) for name, percent in PERCENTILES.items()}
    summary["max"] = float(ordered[-1]) if ordered else math.nan
    summary["samples"] = len(ordered)
    return summary


def _median(values: List[float]) -> float:
    values = [value for value in values if value is not None and not math.isnan(value)]
    return statistics.median(values) if values else math.nan


def _maximum(values: List[float]) -> float:
    values = [value for value in values if value is not None and not math.isnan(value)]
    return max(values) if values else math.nan


def summarize_runs(runs: List[dict]) -> dict:
    """Combine the repeats of one server in one cell: medians, the max of maxima and error totals."""
    completed = [run for run in runs if run["failure"] is None]
    rates = [run["requests_per_second"] for run in completed]
    return {
        "runs": len(runs),
        "failed_runs": len(runs) - len(completed),
        "requests_per_second": _median(rates),
        "requests_per_second_min": min(rates) if rates else math.nan,
        "requests_per_second_max": max(rates) if rates else math.nan,
        "p50_us": _median([run["latency_us"]["p50"] for run in completed]),
        "p99_us": _median([run["latency_us"]["p99"] for run in completed]),
        "p99_us_min": min((run["latency_us"]["p99"] for run in completed), default=math.nan),
        "p99_us_max": _maximum([run["latency_us"]["p99"] for run in completed]),
        "p99.9_us": _median([run["latency_us"]["p99.9"] for run in completed]),
        "max_us": _maximum([run["latency_us"]["max"] for run in completed]),
        "latency_samples": min((run["latency_us"]["samples"] for run in completed), default=0),
        "errors": sum(run["error_total"] + run["warmup_errors"] for run in completed),
        "server_cpu_us_per_request": _median([run["server_cpu_us_per_request"] for run in completed]),
        "tree_cpu_us_per_request": _median([run["tree_cpu_us_per_request"] for run in completed]),
        "server_peak_rss_kib": _maximum([run["server_peak_rss_kib"] for run in completed]),
        "tree_rss_kib": _maximum([run["tree_rss_kib"] for run in completed]),
        "generator_cpu_fraction": _maximum([run["generator_cpu_fraction"] for run in completed]),
    }


def ratio(numerator: float, denominator: float) -> float:
    """Return numerator / denominator, or NaN when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    if denominator == 0:
        return math.nan
    return numerator / denominator


@dataclass(frozen=True)
class Target:
    """One goal for gaspar, its measured value and whether the value meets it."""

    subject: str
    requirement: str
    measured: str
    met: Optional[bool]  # None when the cell was not run or failed


def _ratio_target(subject: str, value: float, limit: float, at_least: bool, requirement: str) -> Target:
    if math.isnan(value):
        return Target(subject, requirement, "not measured", None)
    met = value >= limit if at_least else value <= limit
    return Target(subject, requirement, f"{value:.2f}x", met)


def _server_ratio(summaries: Dict[str, Dict[str, dict]], cell: str, peer: str, metric: str) -> float:
    servers = summaries.get(cell, {})
    if "gaspar" not in servers or peer not in servers:
        return math.nan
    return ratio(servers["gaspar"][metric], servers[peer][metric])


def evaluate_targets(
    summaries: Dict[str, Dict[str, dict]],
    long_run: Optional[dict],
    framing: Optional[dict],
    workers: int,
    handler_seconds: float,
) -> List[Target]:
    """Return the targets table rows, each with its ratio from this run's results."""
    pool = SERVER_TITLES["asyncio-pool"]
    inline = "the Python inline server"
    targets = []

    def peer_ratio(subject, cell, peer, metric, limit, at_least, requirement):
        value = _server_ratio(summaries, cell, peer, metric)
        targets.append(_ratio_target(subject, value, limit, at_least, requirement))

    peer_ratio("echo 16 B, 32 conn, req/s", "echo-16B-32", "asyncio-pool", "requests_per_second", 3, True, f">= 3x {pool}")
    peer_ratio("echo 16 B, 32 conn, req/s", "echo-16B-32", "python-inline", "requests_per_second", 0.5, True, f">= 0.5x {inline}")
    peer_ratio("echo 16 B, 1 conn, p50 latency", "echo-16B-1", "asyncio-pool", "p50_us", 0.4, False, f"<= 0.4x {pool}")
    peer_ratio("echo 16 B, 1 conn, p50 latency", "echo-16B-1", "python-inline", "p50_us", 2, False, f"<= 2x {inline}")
    peer_ratio("CPU-bound, 8 conn, req/s", "cpu-2ms-8", "asyncio-pool", "requests_per_second", 1.4, True, f">= 1.4x {pool}")

    gaspar_cpu = summaries.get("cpu-2ms-8", {}).get("gaspar")
    ideal = workers / handler_seconds if handler_seconds > 0 else math.nan
    value = ratio(gaspar_cpu["requests_per_second"], ideal) if gaspar_cpu else math.nan
    targets.append(
        _ratio_target(
            "CPU-bound, 8 conn, req/s",
            value,
            0.85,
            True,
            f">= 0.85x workers / handler time ({workers} / {handler_seconds * 1000:.2f} ms = {ideal:,.0f} req/s)",
        )
    )

    peer_ratio("echo 1 MiB, 4 conn, req/s", "echo-1MiB-4", "asyncio-pool", "requests_per_second", 3, True, f">= 3x {pool}")
    peer_ratio("echo 1 MiB, 4 conn, req/s", "echo-1MiB-4", "python-inline", "requests_per_second", 1, True, f">= 1x {inline}")

    crowded = summaries.get("echo-16B-256", {}).get("gaspar")
    if crowded and crowded["failed_runs"] < crowded["runs"]:
        targets.append(Target("echo 16 B, 256 conn, gaspar", "zero errors", f"{crowded['errors']} errors", crowded["errors"] == 0))
        tail = ratio(crowded["p99.9_us"], crowded["p50_us"])
        targets.append(_ratio_target("echo 16 B, 256 conn, gaspar", tail, 10, False, "p99.9 <= 10x p50"))
    else:
        targets.append(Target("echo 16 B, 256 conn, gaspar", "zero errors", "not measured", None))
        targets.append(Target("echo 16 B, 256 conn, gaspar", "p99.9 <= 10x p50", "not measured", None))

    targets.extend(_long_run_targets(long_run))

    speedup = framing.get("speedup", math.nan) if framing else math.nan
    targets.append(_ratio_target("framing, 10,000 16 B frames in one buffer", speedup, 5, True, ">= 5x the Python twin"))
    return targets


def _long_run_targets(long_run: Optional[dict]) -> List[Target]:
    subject = "requests in a row, gaspar producer"
    if not long_run or long_run.get("failure"):
        return [
            Target(subject, "RSS flat: last window within 10% of the first", "not measured", None),
            Target(subject, "CPU per request flat: last window within 20% of the first", "not measured", None),
        ]
    subject = f"{long_run['requests']:,} requests in a row, gaspar producer"
    first, last = long_run["first_window"], long_run["last_window"]
    rss_change = ratio(last["rss_kib"], first["rss_kib"]) - 1
    cpu_change = ratio(last["cpu_us_per_request"], first["cpu_us_per_request"]) - 1
    return [
        Target(
            subject,
            "RSS flat: last window within 10% of the first",
            f"{first['rss_kib'] / 1024:.1f} -> {last['rss_kib'] / 1024:.1f} MiB ({rss_change:+.1%})",
            None if math.isnan(rss_change) else abs(rss_change) <= 0.10,
        ),
        Target(
            subject,
            "CPU per request flat: last window within 20% of the first",
            f"{first['cpu_us_per_request']:.1f} -> {last['cpu_us_per_request']:.1f} µs ({cpu_change:+.1%})",
            None if math.isnan(cpu_change) else abs(cpu_change) <= 0.20,
        ),
    ]
