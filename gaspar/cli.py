"""The ``gaspar`` command: serve a handler, or send one request.

    gaspar serve MODULE:ATTR [--host H] [--port P] [--workers N] [limits...]
    gaspar request HOST:PORT [MESSAGE | -]

Every ``serve`` option can also be set with a GASPAR_* environment variable
(``--max-request-size`` reads GASPAR_MAX_REQUEST_SIZE); the command line wins.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import sys
from typing import List, Optional

from gaspar import __version__, client
from gaspar._options import OPTIONS, Option, default_text
from gaspar.consumers import Consumer, Reply
from gaspar.errors import GasparError, RequestFailed, StartupError

log = logging.getLogger("gaspar.cli")

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def load_consumer(target: str) -> Consumer:
    """Import MODULE:ATTR and return it as a Consumer.

    ATTR may name a Consumer instance, a Consumer subclass (instantiated with
    no arguments) or a handler function. Raises ValueError with the reason.
    """
    module_name, separator, attribute = target.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"invalid handler {target!r}: expected MODULE:ATTR, as gaspar.examples:echo")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        # A module can fail to import with any exception, SyntaxError included.
        raise ValueError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc

    value = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None

    if isinstance(value, type) and issubclass(value, Consumer):
        return value()
    if isinstance(value, Consumer):
        return value
    if callable(value):
        return Consumer(handler=value)
    raise ValueError(
        f"{target} is of type {type(value).__name__}; expected a function, a Consumer or a Consumer subclass"
    )


def _env(name: str, default: str) -> str:
    # argparse converts a string default with the option's type, so a bad
    # environment value gets the same error message as a bad option.
    return os.environ.get(f"GASPAR_{name}", default)


def _add_limit(parser: argparse.ArgumentParser, option: Option) -> None:
    """Add one of the Producer's limits as a flag that also reads its GASPAR_* variable."""
    default = default_text(option)
    parser.add_argument(
        option.flag,
        dest=option.name,
        type=option.type,
        default=os.environ.get(option.environment_variable, default),
        metavar=option.metavar,
        help=f"{option.help}; env {option.environment_variable}"
        + ("" if default is None else " (default: %(default)s)"),
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``gaspar`` command."""
    parser = argparse.ArgumentParser(
        prog="gaspar",
        description="Spread CPU-bound Python work over every core behind a tiny TCP daemon.",
    )
    parser.add_argument("--version", action="version", version=f"gaspar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve a handler on TCP",
        description="Serve MODULE:ATTR (a function or a gaspar.Consumer) on TCP with N worker processes.",
    )
    serve.add_argument("target", metavar="MODULE:ATTR", help="the handler to serve, as gaspar.examples:echo")
    serve.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="address to listen on; env GASPAR_HOST (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=_env("PORT", "10123"), help="TCP port; 0 picks a free one; env GASPAR_PORT (default: %(default)s)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=_env("WORKERS", str(os.cpu_count() or 1)),
        help="number of worker processes; env GASPAR_WORKERS (default: the number of CPUs, %(default)s)",
    )
    for option in OPTIONS:
        _add_limit(serve, option)
    serve.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="lowest level of log messages to print; env GASPAR_LOG_LEVEL (default: %(default)s)",
    )
    serve.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text lines, or one JSON object per line for log shippers; env GASPAR_LOG_FORMAT "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--check",
        action="store_true",
        help="import and validate MODULE:ATTR, print what it is and exit without serving",
    )

    send = commands.add_parser(
        "request",
        help="send one request and print the reply",
        description="Send one request and write the raw reply bytes to standard output.",
    )
    send.add_argument("address", metavar="HOST:PORT", help="the daemon's address; [::1]:PORT for IPv6")
    send.add_argument(
        "message",
        nargs="?",
        default="-",
        metavar="MESSAGE",
        help="the request, sent as the bytes given on the command line; '-' or nothing reads it from standard input",
    )
    send.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds the whole request may take, connect included (default: no limit)",
    )
    return parser


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object: time (UTC), level, logger, pid, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ImportedConsumer(Consumer):
    """The consumer named by MODULE:ATTR; a reload (SIGHUP) imports its module afresh.

    Only that module is reloaded, not the modules it imports.
    """

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.consumer = load_consumer(target)

    def setup(self) -> None:
        self.consumer.setup()

    def handle(self, message: bytes) -> Reply:
        return self.consumer.handle(message)

    def reloaded(self) -> Consumer:
        module_name = self.target.partition(":")[0]
        module = sys.modules.get(module_name)
        if module is not None:
            importlib.reload(module)
        return load_consumer(self.target)

    def __repr__(self) -> str:
        return f"<ImportedConsumer {self.target}: {self.consumer!r}>"


def configure_logging(level: str, log_format: str) -> None:
    """Send log records to stderr as text lines or JSON objects."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())


def serve(arguments: argparse.Namespace) -> int:
    """Run the daemon until SIGINT or SIGTERM; return the exit status."""
    from gaspar.producers import Producer

    configure_logging(arguments.log_level, arguments.log_format)
    try:
        consumer = ImportedConsumer(arguments.target)
        if arguments.check:
            print(f"{arguments.target}: OK, {consumer.consumer!r}")
            return 0
        if arguments.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {arguments.workers}")
        limits = {option.name: getattr(arguments, option.name) for option in OPTIONS}
        producer = Producer(consumer, arguments.port, processes=arguments.workers, host=arguments.host, **limits)
    except (TypeError, ValueError) as exc:
        print(f"gaspar serve: {exc}", file=sys.stderr)
        return 2
    try:
        producer.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    except GasparError as exc:
        log.error("stopped with an error: %s", exc)
        return 1
    return 0


def send_request(arguments: argparse.Namespace) -> int:
    """Send one request; write the reply to stdout and return the exit status."""
    if arguments.message == "-":
        message = sys.stdin.buffer.read()
    else:
        # fsencode() undoes how Python decoded argv, so bytes that are not
        # valid UTF-8 are sent unchanged instead of failing to encode.
        message = os.fsencode(arguments.message)
    try:
        reply = client.request(arguments.address, message, timeout=arguments.timeout)
    except RequestFailed as exc:
        print(f"gaspar request: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"gaspar request: {arguments.address}: {exc}", file=sys.stderr)
        return 1
    try:
        sys.stdout.buffer.write(reply)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # The reader went away (as with `| head`); that is not our failure.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status."""
    arguments = build_parser().parse_args(argv)
    if arguments.command == "serve":
        return serve(arguments)
    return send_request(arguments)
