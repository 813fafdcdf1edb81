"""An asyncio HTTP service that hashes passwords without blocking its event loop.

    python examples/offload_service.py --port 8080 [--workers N] [--inline]
    curl --data-binary hunter2 http://127.0.0.1:8080/hash
    curl http://127.0.0.1:8080/ping

POST /hash with a password as the body returns the hex scrypt digest from
gaspar.examples.scrypt_hash, which takes about 50 ms of CPU. GET /ping
returns "pong" at once, so its latency shows whether the event loop is free.

By default the service embeds a gaspar daemon with N worker processes and
sends each hash to it with gaspar.client.request_async, so the loop goes on
serving while the workers hash. With --inline it calls scrypt_hash in the
event loop instead, as a naive service would, and every other request waits
behind each hash.

The HTTP handling uses only the standard library and is minimal on purpose:
one request per connection, a body given by Content-Length, no chunked
encoding and no keep-alive. A real service would use an HTTP framework, and
the gaspar part stays the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from typing import Awaitable, Callable, List, Optional, Tuple

import gaspar
from gaspar.examples import scrypt_hash

log = logging.getLogger("offload_service")

# Limits on what a client may send, and the seconds it gets to send it.
MAX_HEADER_SIZE = 16 * 1024
MAX_BODY_SIZE = 64 * 1024
REQUEST_READ_TIMEOUT = 10.0
# Seconds one hash may take in the daemon, queueing included.
HASH_TIMEOUT = 10.0

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}

HashFunction = Callable[[bytes], Awaitable[bytes]]


class HttpError(Exception):
    """A request that gets an error response: ``status`` and a plain-text ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the two ways to hash ------------------------------------------------------


def offloaded_hasher(daemon_address: str) -> HashFunction:
    """Return a hash function that sends each password to the gaspar daemon at daemon_address."""

    async def hash_password(password: bytes) -> bytes:
        return await gaspar.client.request_async(daemon_address, password, timeout=HASH_TIMEOUT)

    return hash_password


async def hash_inline(password: bytes) -> bytes:
    """Hash in the event loop, which can run nothing else for those 50 ms."""
    return scrypt_hash(password)


# -- HTTP ----------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> Tuple[str, str, bytes]:
    """Read one HTTP/1.1 request and return its method, path and body.

    Raises HttpError for a request this service cannot accept, and
    asyncio.IncompleteReadError when the client closes the connection early.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(400, f"request header is larger than {MAX_HEADER_SIZE} bytes") from None

    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"invalid request line {request_line!r}")
    method, path, _version = parts

    headers = {}
    for line in header_lines:
        if not line:
            continue
        name, separator, value = line.partition(":")
        if not separator:
            raise HttpError(400, f"invalid header line {line!r}")
        headers[name.strip().lower()] = value.strip()

    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked bodies are not supported; send Content-Length")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):
        raise HttpError(400, f"invalid Content-Length {length_text!r}")
    length = int(length_text)
    if length > MAX_BODY_SIZE:
        raise HttpError(413, f"body of {length} bytes is larger than the maximum of {MAX_BODY_SIZE} bytes")
    body = await reader.readexactly(length)
    return method, path, body


def format_response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


async def route(method: str, path: str, body: bytes, hash_password: HashFunction) -> Tuple[int, bytes]:
    """Run the endpoint for method and path and return the status and body of its response."""
    if path == "/ping":
        if method != "GET":
            raise HttpError(405, "use GET /ping")
        return 200, b"pong"

    if path == "/hash":
        if method != "POST":
            raise HttpError(405, "use POST /hash with the password as the body")
        try:
            digest = await hash_password(body)
        except TimeoutError:
            log.error("hashing timed out after %s s", HASH_TIMEOUT)
            raise HttpError(504, "hashing timed out") from None
        except OSError as error:
            # RequestFailed (the daemon reset the request) or a failed connection to the daemon.
            log.error("hashing failed: %s", error)
            raise HttpError(502, "hashing failed") from None
        return 200, digest

    raise HttpError(404, f"no endpoint at {path}; try GET /ping or POST /hash")


async def handle_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hash_password: HashFunction
) -> None:
    """Serve the one request of a connection, then close it."""
    client = writer.get_extra_info("peername")
    try:
        try:
            method, path, body = await asyncio.wait_for(read_request(reader), REQUEST_READ_TIMEOUT)
            status, reply = await route(method, path, body, hash_password)
        except HttpError as error:
            log.debug("responding %d to %s: %s", error.status, client, error.message)
            status, reply = error.status, error.message.encode("utf-8")
        except asyncio.TimeoutError:
            log.debug("responding 408 to %s: no complete request within %s s", client, REQUEST_READ_TIMEOUT)
            status, reply = 408, f"no complete request within {REQUEST_READ_TIMEOUT} s".encode("utf-8")
        writer.write(format_response(status, reply))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError) as error:
        log.debug("client %s left before its response: %r", client, error)
    except Exception:
        log.exception("request from %s failed with an unexpected error", client)
        with contextlib.suppress(ConnectionError):
            writer.write(format_response(500, b"internal error"))
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, port: int, hash_password: HashFunction, mode: str) -> None:
    """Serve HTTP on host:port until SIGINT or SIGTERM."""
    server = await asyncio.start_server(
        functools.partial(handle_connection, hash_password=hash_password), host, port, limit=MAX_HEADER_SIZE
    )
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    log.info("listening on http://%s:%d (%s)", url_host, bound_port, mode)
    async with server:
        await stop.wait()
    log.info("stopping")


# -- command line --------------------------------------------------------------


def parse_arguments(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An asyncio HTTP service that offloads scrypt hashing to gaspar.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8080, help="TCP port to listen on; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="gaspar worker processes that hash (default: the CPU count, %(default)s)",
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="hash in the event loop instead of in gaspar workers, for comparison",
    )
    arguments = parser.parse_args(argv)
    if arguments.workers < 1:
        parser.error(f"--workers must be at least 1, got {arguments.workers}")
    return arguments


def main(argv: Optional[List[str]] = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        run(arguments)
    except (gaspar.StartupError, OSError) as error:
        # The daemon could not start, or the HTTP port could not be bound.
        log.error("cannot start: %s", error)
        return 1
    return 0


def run(arguments: argparse.Namespace) -> None:
    if arguments.inline:
        asyncio.run(serve(arguments.host, arguments.port, hash_inline, "inline: hashing in the event loop"))
        return

    # The daemon listens on a free loopback port. It starts before the event
    # loop and stops after it, so no request can reach a stopped daemon.
    with gaspar.Producer(scrypt_hash, 0, processes=arguments.workers) as daemon:
        mode = f"offload: hashing in {arguments.workers} gaspar workers at {daemon.address}"
        asyncio.run(serve(arguments.host, arguments.port, offloaded_hasher(daemon.address), mode))


if __name__ == "__main__":
    sys.exit(main())
