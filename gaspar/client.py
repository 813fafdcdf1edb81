"""Clients for the gaspar protocol.

request() blocks. It uses only the standard socket module, so it also works
under gevent or eventlet monkey-patching. request_async() is its asyncio
twin, built on asyncio streams, with the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, List, Optional, Tuple

from gaspar.errors import RequestFailed
from gaspar.framing import pack

if TYPE_CHECKING:
    # Only type checkers import typing_extensions, which gaspar does not
    # depend on. collections.abc.Buffer is new in Python 3.12.
    from typing_extensions import Buffer

__all__ = ["pack", "parse_address", "request", "request_async"]

_RECV_SIZE = 256 * 1024


def parse_address(address: str) -> Tuple[str, int]:
    """Split "host:port" or "[IPv6 host]:port" into (host, port).

    Raises ValueError naming the address when its host or port is invalid.
    """
    host, separator, port_text = address.rpartition(":")
    # str.isdigit() also accepts digits such as "²" or "٨", which int() rejects or reads as a number.
    if not separator or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"invalid address {address!r}: expected host:port or [IPv6]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid address {address!r}: put an IPv6 host in brackets, as [::1]:port")
    if not host or "[" in host or "]" in host:
        raise ValueError(f"invalid host in address {address!r}: expected host:port or [IPv6]:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port} in address {address!r}: expected 1 to 65535")
    return host, port


def request(address: str, message: Buffer, timeout: Optional[float] = None) -> bytes:
    """Send one request to a gaspar daemon and return its reply.

    ``message`` is bytes-like; encode a str first. ``timeout`` bounds the
    whole request, connect included, in seconds (None: no limit).

    Raises:
        RequestFailed: the server reset the connection, which is how it
            reports a failed request.
        TimeoutError: ``timeout`` passed.
        OSError: the connection failed, as ConnectionRefusedError does.
    """
    host, port = parse_address(address)
    frame = pack(message)
    deadline = None if timeout is None else time.monotonic() + timeout

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout as exc:
        raise TimeoutError(f"connecting to {address} timed out after {timeout} s") from exc
    except ConnectionResetError as exc:
        # The server accepted and reset the connection before connect()
        # returned: a rejected request, unlike a refused connection.
        raise RequestFailed(address) from exc
    try:
        # A socket timeout limits each call on its own (sendall() as a whole),
        # so every call gets only the time left before the deadline.
        _set_remaining_timeout(sock, deadline, address, timeout)
        sock.sendall(frame)
        chunks: List[bytes] = []
        while True:
            _set_remaining_timeout(sock, deadline, address, timeout)
            chunk = sock.recv(_RECV_SIZE)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except socket.timeout as exc:
        raise TimeoutError(f"request to {address} timed out after {timeout} s") from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise RequestFailed(address) from exc
    finally:
        sock.close()


def _set_remaining_timeout(
    sock: socket.socket, deadline: Optional[float], address: str, timeout: Optional[float]
) -> None:
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"request to {address} timed out after {timeout} s")
    sock.settimeout(remaining)


async def request_async(address: str, message: Buffer, timeout: Optional[float] = None) -> bytes:
    """Send one request to a gaspar daemon from asyncio and return its reply.

    The arguments, result and exceptions are those of request(): RequestFailed
    when the server resets the connection, TimeoutError when ``timeout``
    passes (connect included), and OSError (for example
    ConnectionRefusedError) when it cannot connect. The event loop keeps
    running other tasks while this one waits.
    """
    host, port = parse_address(address)
    frame = pack(message)
    try:
        return await asyncio.wait_for(_exchange(host, port, frame), timeout)
    except asyncio.TimeoutError as exc:
        if timeout is None:
            # From Python 3.11 on this also catches the kernel's connect timeout (ETIMEDOUT).
            raise
        # asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on.
        raise TimeoutError(f"request to {address} timed out after {timeout} s") from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise RequestFailed(address) from exc


async def _exchange(host: str, port: int, frame: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, limit=_RECV_SIZE)
    replied = False
    try:
        writer.write(frame)
        await writer.drain()
        # read() raises the reset even when part of the reply is already buffered.
        reply = await reader.read()
        replied = True
        return reply
    finally:
        if replied:
            writer.close()
        else:
            # close() would first wait to send what is still buffered, which a
            # server that stopped reading never takes.
            writer.transport.abort()
        # wait_closed() raises the error that ended the connection, already handled above.
        with contextlib.suppress(OSError):
            await writer.wait_closed()
