"""Start and stop server processes, and drive the C load generator against them."""

from __future__ import annotations

import array
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks import procfs

HOST = "127.0.0.1"
# Time a server gets to print its port and reply to the first request.
STARTUP_TIMEOUT_SECONDS = 60.0
# Time a server gets to exit after SIGTERM before it and its processes are killed.
STOP_TIMEOUT_SECONDS = 30.0
# Extra time the harness allows a load generator beyond its own limits before killing it.
LOADGEN_GRACE_SECONDS = 30.0

ERROR_KINDS = ("connect", "reset", "mismatch", "short", "timeout", "other")


class RunFailed(RuntimeError):
    """A server or the load generator did not start, crashed or ran past its time limit."""


def frame(payload: bytes) -> bytes:
    """Return ``payload`` with its 4-byte big-endian length in front."""
    return len(payload).to_bytes(4, "big") + payload


class ServerProcess:
    """One server under test, run as a child process that prints "PORT <n>" once it listens."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: Optional[Dict[str, str]] = None):
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, probe_request: bytes, probe_reply: bytes, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start the process, read its port, then send one request and check the reply.

        Raises RunFailed, with the end of the server's log, when the port or
        a correct reply does not come within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=self.env,
                bufsize=0,
            )
        line = self._read_port_line(deadline)
        if not line.startswith(b"PORT "):
            raise RunFailed(f"{self.name} printed {line!r} instead of PORT <n>{self._log_tail()}")
        self.port = int(line.split()[1])
        self._probe(probe_request, probe_reply, deadline)

    def _read_port_line(self, deadline: float) -> bytes:
        stdout = self.process.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RunFailed(f"{self.name} did not print its port in time{self._log_tail()}")
                if selector.select(remaining):
                    # The server writes the whole line at once, so readline() does not block for long.
                    line = stdout.readline()
                    if not line:
                        self.process.wait()
                        raise RunFailed(
                            f"{self.name} exited with status {self.process.returncode} before listening{self._log_tail()}"
                        )
                    return line.strip()

    def _probe(self, request: bytes, expected: bytes, deadline: float) -> None:
        """Send one request, retrying refused connections until ``deadline``; check the reply."""
        last_error: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RunFailed(f"{self.name} exited with status {self.process.returncode}{self._log_tail()}")
            try:
                reply = send_request(self.port, frame(request), deadline - time.monotonic())
            except ConnectionRefusedError as exc:
                last_error = exc
                time.sleep(0.05)
                continue
            except OSError as exc:
                raise RunFailed(f"the first request to {self.name} failed: {exc}{self._log_tail()}") from exc
            if reply != expected:
                raise RunFailed(
                    f"{self.name} replied {len(reply)} bytes to the first request, "
                    f"not the expected {len(expected)} bytes{self._log_tail()}"
                )
            return
        raise RunFailed(f"{self.name} did not reply to the first request in time (last error: {last_error}){self._log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Send SIGTERM and wait; SIGKILL the server and every process it started if it does not exit.

        Also kills descendants that outlive a clean exit, so no process of a
        run survives into the next one.
        """
        process = self.process
        if process is None or process.returncode is not None:
            return
        tree = _identify(procfs.process_tree(process.pid))
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"warning: {self.name} (pid {process.pid}) ignored SIGTERM for {timeout} s; killing it", file=sys.stderr)
        finally:
            for pid, start_time in tree.items():
                if _start_time(pid) == start_time:
                    if pid != process.pid:
                        print(f"warning: killing pid {pid}, left behind by {self.name}", file=sys.stderr)
                    _kill_quietly(pid)
            process.wait()
            if process.stdout is not None:
                process.stdout.close()

    def exit_status(self) -> Optional[int]:
        """Return the exit status if the server has exited, else None."""
        return self.process.poll() if self.process is not None else None

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n  server log (" + str(self.log_path) + "):\n    " + "\n    ".join(text) if text else ""


def _start_time(pid: int) -> Optional[int]:
    """Return the start time of pid in clock ticks since boot, or None when it has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    # Field 22 of proc(5), starttime, is 19 after the state field.
    return int(fields[19])


def _identify(pids: List[int]) -> Dict[int, Optional[int]]:
    """Return each pid with its start time, so a later kill cannot hit a reused pid."""
    return {pid: _start_time(pid) for pid in pids}


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def send_request(port: int, framed_request: bytes, timeout: float) -> bytes:
    """Send one framed request to 127.0.0.1:port and return the reply, read until EOF."""
    with socket.create_connection((HOST, port), timeout=max(timeout, 0.001)) as sock:
        sock.sendall(framed_request)
        chunks = []
        while True:
            chunk = sock.recv(1024 * 1024)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@dataclass
class LoadResult:
    """Measurements of one load generator run."""

    completed: int
    errors: Dict[str, int]
    elapsed_seconds: float
    # Latency of every successful request in microseconds, in completion order.
    latencies_us: array.array
    # User plus system CPU seconds of the load generator process.
    cpu_seconds: float
    checkpoints: List[int] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class LoadSpec:
    """The arguments of one load generator run."""

    port: int
    connections: int
    max_requests: int
    max_seconds: float
    request_timeout: float
    request_path: Path
    expected_path: Path
    pause_at: Sequence[int] = ()


def run_load(
    loadgen: Path,
    spec: LoadSpec,
    work_dir: Path,
    on_checkpoint: Optional[Callable[[int], None]] = None,
) -> LoadResult:
    """Run the load generator until it finishes; return what it measured.

    ``on_checkpoint(completed)`` runs at each of ``spec.pause_at`` while no
    request is in flight. Raises RunFailed when the generator fails or runs
    past its own limits plus LOADGEN_GRACE_SECONDS, after killing it.
    """
    latencies_path = work_dir / "latencies.bin"
    stderr_path = work_dir / "loadgen.log"
    command = [
        str(loadgen),
        "--host", HOST,
        "--port", str(spec.port),
        "--connections", str(spec.connections),
        "--requests", str(spec.max_requests),
        "--duration", f"{spec.max_seconds:.3f}",
        "--timeout", f"{spec.request_timeout:.3f}",
        "--request", str(spec.request_path),
        "--expected", str(spec.expected_path),
        "--latencies", str(latencies_path),
    ]  # fmt: skip
    for count in spec.pause_at:
        command += ["--pause-at", str(count)]
    # The generator may overrun max_seconds by one request timeout while
    # requests in flight finish; the harness waits longer before it kills it.
    deadline = time.monotonic() + spec.max_seconds + spec.request_timeout + LOADGEN_GRACE_SECONDS

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(stderr_path, "wb") as stderr_file:
        # Unbuffered, so that each readline() after select() takes only bytes already in the pipe.
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file, bufsize=0
        )
    summary: Dict[str, int] = {}
    checkpoints: List[int] = []
    try:
        for line in _read_lines(process.stdout, deadline):
            key, _, value = line.decode().partition(" ")
            if key == "checkpoint":
                checkpoints.append(int(value))
                if on_checkpoint is not None:
                    on_checkpoint(int(value))
                process.stdin.write(b"\n")
                process.stdin.flush()
            else:
                summary[key] = int(value)
        process.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise RunFailed(f"the load generator ran past its time limit; command: {' '.join(command)}") from None
    finally:
        if process.poll() is None:
            _kill_quietly(process.pid)
            process.wait()
        process.stdin.close()
        process.stdout.close()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)

    if process.returncode != 0 or "completed" not in summary:
        message = stderr_path.read_text(errors="replace").strip()
        raise RunFailed(f"the load generator failed with status {process.returncode}: {message}")

    latencies = array.array("I")
    if latencies.itemsize != 4:
        raise RuntimeError("array type 'I' is not 32 bits on this platform")
    with open(latencies_path, "rb") as latencies_file:
        latencies.frombytes(latencies_file.read())
    cpu_seconds = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return LoadResult(
        completed=summary["completed"],
        errors={kind: summary.get(f"errors_{kind}", 0) for kind in ERROR_KINDS},
        elapsed_seconds=summary["elapsed_us"] / 1e6,
        latencies_us=latencies,
        cpu_seconds=cpu_seconds,
        checkpoints=checkpoints,
    )


def _read_lines(stream, deadline: float):
    """Yield lines from a pipe until EOF; raise subprocess.TimeoutExpired at ``deadline``."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise subprocess.TimeoutExpired("loadgen", 0)
            line = stream.readline()
            if not line:
                return
            yield line.strip()
