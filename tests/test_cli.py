"""Tests of the gaspar command line.

`gaspar serve` runs as a real subprocess (``python -m gaspar serve``), and
the tests read its log on standard error to learn the port it bound. Tests
of `gaspar request` call main() in this process where they can, and run it
as a subprocess where the bytes of argv or the stdout pipe matter.
"""

import concurrent.futures
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import gaspar
from gaspar import client
import gaspar.examples
from gaspar._options import OPTIONS
from gaspar.cli import build_parser, main

from conftest import descendant_pids, subprocess_env, wait_for

PASSWORD = b"hunter2"
# What gaspar.examples:scrypt_hash must return, computed here independently.
PASSWORD_DIGEST = hashlib.scrypt(PASSWORD, salt=b"gaspar-example-salt", n=2**14, r=8, p=1).hex().encode("ascii")

LISTENING = re.compile(r"listening on (\S+):(\d+) with (\d+) workers?\b")

# A handler for `gaspar serve`, written to a module on the child's PYTHONPATH.
HANDLERS_SOURCE = '''
import time


def slow(message):
    """Create the file whose path is the request, then work for 0.5 s."""
    with open(message, "wb"):
        pass
    time.sleep(0.5)
    return b"finished"
'''


def cli_env(**overrides) -> dict:
    """Return an environment for a gaspar child process without the caller's GASPAR_* settings."""
    env = {name: value for name, value in subprocess_env().items() if not name.startswith("GASPAR_")}
    # Wide enough that argparse does not wrap an option and its metavar apart.
    env["COLUMNS"] = "200"
    env.update(overrides)
    return env


def run_cli(*arguments, input=None, env=None, timeout=30) -> subprocess.CompletedProcess:
    """Run ``python -m gaspar ARGUMENTS`` to completion and capture its output as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "gaspar", *arguments],
        input=input,
        capture_output=True,
        env=env if env is not None else cli_env(),
        timeout=timeout,
    )


def is_running(pid: int) -> bool:
    """Return whether pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def closed_port_address() -> str:
    """Return "127.0.0.1:PORT" for a port that was just free and has no listener."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"127.0.0.1:{port}"


class ServeProcess:
    """A ``python -m gaspar serve`` subprocess whose standard error a thread collects."""

    def __init__(self, arguments, env=None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gaspar", "serve", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env if env is not None else cli_env(),
        )
        self._lines = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.host = None
        self.port = None
        self.workers = None

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self._lines.append(line.decode("utf-8", "replace"))

    @property
    def log(self) -> str:
        return "".join(self._lines)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_listening(self, timeout: float = 30) -> None:
        """Wait for the "listening on" log line and store the host, port and worker count from it."""

        deadline = time.monotonic() + timeout
        while True:
            match = LISTENING.search(self.log)
            if match is not None:
                break
            if self.process.poll() is not None:
                pytest.fail(f"gaspar serve exited with {self.process.returncode} before listening:\n{self.log}")
            if time.monotonic() >= deadline:
                pytest.fail(f"gaspar serve logged no 'listening on' line within {timeout} s:\n{self.log}")
            time.sleep(0.01)
        self.host = match.group(1)
        self.port = int(match.group(2))
        self.workers = int(match.group(3))

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit and its log to be read to the end; return its exit status."""
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        return returncode

    def close(self) -> None:
        """Stop the process and every process it started, even after a failed test."""
        tree = descendant_pids(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        # The fork server and the workers are no longer our descendants once
        # the serve process is gone, so the autouse leak check cannot see them.
        for pid in tree:
            if is_running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reader.join(10)
        self.process.stderr.close()


@pytest.fixture
def serve():
    """Return a function that starts ``gaspar serve ARGUMENTS`` and waits until it listens."""
    started = []

    def start(*arguments, env=None):
        server = ServeProcess(arguments, env)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def scrypt_server(serve):
    return serve("gaspar.examples:scrypt_hash", "--port", "0", "--workers", "2")


@pytest.fixture
def handlers_env(tmp_path):
    """Return an environment in which the child can import the module cli_test_handlers."""
    (tmp_path / "cli_test_handlers.py").write_text(HANDLERS_SOURCE)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


@pytest.fixture
def netcat():
    """Return the nc command and the option that makes it close its sending side at end of input."""
    path = shutil.which("nc")
    if path is None:
        pytest.skip("the nc (netcat) binary is not installed")
    usage = subprocess.run([path, "-h"], capture_output=True, timeout=10)
    text = (usage.stdout + usage.stderr).decode("utf-8", "replace")
    # OpenBSD netcat: -N shuts down the socket after EOF on standard input.
    if re.search(r"^\s*-N\b", text, re.MULTILINE):
        return [path, "-N"]
    # Traditional netcat: -q SECONDS quits that long after EOF on standard input.
    if re.search(r"^\s*-q\b", text, re.MULTILINE):
        return [path, "-q", "1"]
    pytest.skip(f"{path} supports neither -N nor -q, so it would not end the request")


# -- Help and version -----------------------------------------------------------


def test_cli_help():
    result = run_cli("--help")

    assert result.returncode == 0
    output = result.stdout.decode()
    for word in ["serve", "request", "--version"]:
        assert word in output, word


def test_cli_serve_help():
    result = run_cli("serve", "--help")

    assert result.returncode == 0
    output = result.stdout.decode()
    for option in [
        "MODULE:ATTR",
        "--host HOST",
        "--port PORT",
        "--workers WORKERS",
        "--max-request-size BYTES",
        "--read-timeout SECONDS",
        "--graceful-timeout SECONDS",
        "--startup-timeout SECONDS",
        "--log-level",
    ]:
        assert option in output, option


def test_cli_request_help():
    result = run_cli("request", "--help")

    assert result.returncode == 0
    output = result.stdout.decode()
    for option in ["HOST:PORT", "MESSAGE", "--timeout SECONDS"]:
        assert option in output, option


def test_cli_version():
    result = run_cli("--version")

    assert result.returncode == 0
    assert result.stdout.decode() == f"gaspar {gaspar.__version__}\n"


def test_cli_no_command():
    result = run_cli()

    assert result.returncode == 2
    assert b"COMMAND" in result.stderr


# -- gaspar serve --------------------------------------------------------------


def test_cli_serve_listening_line(scrypt_server):
    assert scrypt_server.host == "127.0.0.1"
    assert scrypt_server.port != 0
    assert scrypt_server.workers == 2


def test_cli_serve_request_command(scrypt_server):
    result = run_cli("request", scrypt_server.address, PASSWORD.decode())

    assert result.stderr == b""
    assert result.returncode == 0
    assert result.stdout == PASSWORD_DIGEST


def test_cli_serve_raw_client(scrypt_server):
    with socket.create_connection(("127.0.0.1", scrypt_server.port), timeout=30) as sock:
        sock.sendall(struct.pack("!I", len(PASSWORD)) + PASSWORD)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)

    assert b"".join(chunks) == PASSWORD_DIGEST


def test_cli_serve_netcat(netcat, scrypt_server):
    result = subprocess.run(
        [*netcat, "127.0.0.1", str(scrypt_server.port)],
        input=b"\x00\x00\x00\x07" + PASSWORD,
        capture_output=True,
        timeout=30,
    )

    assert result.returncode == 0
    assert result.stdout == PASSWORD_DIGEST


@pytest.mark.parametrize("arguments", [["-"], []], ids=["dash", "no-message"])
def test_cli_serve_request_stdin(scrypt_server, arguments):
    result = run_cli("request", scrypt_server.address, *arguments, input=PASSWORD)

    assert result.returncode == 0
    assert result.stdout == PASSWORD_DIGEST


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serve_stops_on_signal(scrypt_server, signum):
    process = scrypt_server.process

    def fork_server_and_workers():
        pids = descendant_pids(process.pid)
        return pids if len(pids) >= 3 else None

    tree = wait_for(fork_server_and_workers, 10, "gaspar serve has a fork server and 2 workers")

    process.send_signal(signum)
    returncode = scrypt_server.wait_exit(10)

    assert returncode == 0
    wait_for(lambda: not any(is_running(pid) for pid in tree), 10, f"processes {tree} of gaspar serve exit")
    assert "stopped" in scrypt_server.log
    assert "Traceback" not in scrypt_server.log


def test_cli_serve_drains_in_flight(serve, handlers_env, tmp_path):
    server = serve("cli_test_handlers:slow", "--port", "0", "--workers", "1", env=handlers_env)
    marker = tmp_path / "request-started"

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        reply = pool.submit(client.request, server.address, os.fsencode(marker), 30)
        wait_for(marker.exists, 10, "the handler starts the request")
        server.process.send_signal(signal.SIGTERM)

        assert reply.result(30) == b"finished"
    assert server.wait_exit(10) == 0
    assert "stopped" in server.log


def test_cli_serve_environment_defaults(serve):
    # GASPAR_PORT=0 replaces the default port 10123, and --workers wins over GASPAR_WORKERS.
    server = serve("gaspar.examples:echo", "--workers", "1", env=cli_env(GASPAR_PORT="0", GASPAR_WORKERS="3"))

    assert server.port != 10123
    assert server.workers == 1
    assert client.request(server.address, b"ping", timeout=10) == b"ping"


@pytest.mark.parametrize(
    "target, message",
    [
        ("gaspar.examples", "invalid handler 'gaspar.examples': expected MODULE:ATTR"),
        ("gaspar_no_such_module:echo", "cannot import module 'gaspar_no_such_module'"),
        ("gaspar.examples:no_such_handler", "module 'gaspar.examples' has no attribute 'no_such_handler'"),
        ("gaspar._constants:HEADER_SIZE", "gaspar._constants:HEADER_SIZE is of type int"),
    ],
    ids=["no-colon", "missing-module", "missing-attribute", "int-attribute"],
)
def test_cli_serve_bad_target(target, message):
    result = run_cli("serve", target, "--port", "0", "--workers", "1")

    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert message in stderr
    assert "Traceback" not in stderr


def test_cli_serve_invalid_workers():
    result = run_cli("serve", "gaspar.examples:echo", "--port", "0", "--workers", "0")

    assert result.returncode == 2
    assert b"got 0" in result.stderr


def test_cli_serve_env_port_invalid(monkeypatch, capsys):
    monkeypatch.setenv("GASPAR_PORT", "abc")

    with pytest.raises(SystemExit) as caught:
        main(["serve", "gaspar.examples:echo"])

    assert caught.value.code == 2
    assert "argument --port: invalid int value: 'abc'" in capsys.readouterr().err


def test_cli_env_port_ignored_by_request(monkeypatch, capsysbinary):
    # The request command has no --port, so a bad GASPAR_PORT must not break it.
    monkeypatch.setenv("GASPAR_PORT", "abc")
    address = closed_port_address()

    returncode = main(["request", address, "x"])

    assert returncode == 1
    assert address.encode() in capsysbinary.readouterr().err


def test_cli_serve_port_taken():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run_cli("serve", "gaspar.examples:echo", "--port", str(port), "--workers", "1")

    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


# -- gaspar request ------------------------------------------------------------


def test_cli_request_closed_port(capsysbinary):
    address = closed_port_address()

    returncode = main(["request", address, "x"])

    assert returncode == 1
    output = capsysbinary.readouterr()
    assert output.out == b""
    assert address.encode() in output.err
    assert b"Connection refused" in output.err


def test_cli_request_handler_error(start_producer, capsysbinary):
    def fail(message):
        raise RuntimeError("the handler failed on purpose")

    producer = start_producer(fail, processes=1)

    returncode = main(["request", producer.address, "x"])

    assert returncode == 1
    output = capsysbinary.readouterr()
    assert output.out == b""
    assert f"request to {producer.address} failed".encode() in output.err


def test_cli_request_timeout(capsysbinary):
    # A listener that never accepts: the connect succeeds, no reply ever comes.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        returncode = main(["request", address, "x", "--timeout", "0.3"])

    assert returncode == 1
    output = capsysbinary.readouterr()
    assert output.out == b""
    assert b"timed out" in output.err
    assert address.encode() in output.err


def test_cli_request_invalid_address(capsysbinary):
    returncode = main(["request", "localhost", "x"])

    assert returncode == 1
    assert b"'localhost'" in capsysbinary.readouterr().err


def test_cli_request_stdin_binary(start_producer, monkeypatch, capsysbinary):
    producer = start_producer(lambda message: message, processes=1)
    message = bytes(range(256))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(message)))

    returncode = main(["request", producer.address, "-"])

    assert returncode == 0
    assert capsysbinary.readouterr().out == message


def test_cli_request_non_utf8_argument(start_producer):
    # Bytes in argv that are not UTF-8 reach Python as surrogate escapes.
    producer = start_producer(lambda message: message, processes=1)
    message = b"caf\xc3\xa9 \xff\xfe"

    result = run_cli(b"request", producer.address.encode(), message)

    assert result.stderr == b""
    assert result.returncode == 0
    assert result.stdout == message


def test_cli_request_stdout_closed_early(start_producer, tmp_path):
    # A reader that goes away, as `gaspar request ... | head -c 0` does, is not an error.
    # The handler replies only once the reader is gone, so writing the reply fails with EPIPE.
    gate = tmp_path / "reader-closed"

    def reply_when_gate_exists(message):
        deadline = time.monotonic() + 20
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return b"a reply nobody reads"

    producer = start_producer(reply_when_gate_exists, processes=1)
    process = subprocess.Popen(
        [sys.executable, "-m", "gaspar", "request", producer.address, "x"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        process.stdout.close()
        gate.touch()
        returncode = process.wait(30)
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stderr.close()

    assert returncode == 0
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr


# -- Limits: one flag and one environment variable per Producer option ---------


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_cli_serve_limit_flag(option):
    value = "7" if option.type is int else "7.5"

    arguments = build_parser().parse_args(["serve", "gaspar.examples:echo", option.flag, value])

    assert getattr(arguments, option.name) == option.type(value)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_cli_serve_limit_environment(option, monkeypatch):
    value = "9" if option.type is int else "9.5"
    monkeypatch.setenv(option.environment_variable, value)

    arguments = build_parser().parse_args(["serve", "gaspar.examples:echo"])

    assert getattr(arguments, option.name) == option.type(value)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_cli_serve_limit_reaches_producer(option):
    arguments = build_parser().parse_args(["serve", "gaspar.examples:echo"])
    limits = {limit.name: getattr(arguments, limit.name) for limit in OPTIONS}

    producer = gaspar.Producer(gaspar.examples.echo, 0, processes=1, **limits)

    expected = option.default
    if option.name == "max_in_flight":
        expected = 4
    elif option.name == "max_requests_jitter":
        expected = 0
    if option.name == "kill_timeout":
        assert producer.forker.kill_timeout == expected
    else:
        assert getattr(producer, option.name) == expected


def test_producer_rejects_unknown_option():
    with pytest.raises(TypeError, match="unknown Producer option 'max_request'"):
        gaspar.Producer(gaspar.examples.echo, 0, max_request=5)


@pytest.mark.parametrize(
    "name, value, error",
    [
        ("max_request_size", -1, ValueError),
        ("max_request_size", 2**32, ValueError),
        ("read_timeout", 0, ValueError),
        ("timeout", "5", TypeError),
        ("max_in_flight", 1.5, TypeError),
        ("prefetch", True, TypeError),
    ],
)
def test_producer_rejects_invalid_option(name, value, error):
    with pytest.raises(error, match=name):
        gaspar.Producer(gaspar.examples.echo, 0, **{name: value})
