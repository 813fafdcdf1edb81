"""One client connection of the producer and the socket I/O on it.

A connection carries exactly one request. It moves through these states::

    READING ──frame complete──> QUEUED ──a worker is free──> DISPATCHED
       └────────frame complete, a worker is free─────────────────┘
    DISPATCHED ──reply arrives──> WRITING ──reply sent──> CLOSED (FIN)

Any failure on the way ends it in CLOSED by a reset (RST), the protocol's
failure signal. The methods here do the socket work; the producer decides
the transitions.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Optional, Union

from gaspar._constants import HEADER_SIZE
from gaspar.errors import FrameTooLarge
from gaspar.framing import FrameParser, unpack_header

if TYPE_CHECKING:
    from gaspar.workers import WorkerProcess

# A complete request payload: a view of the first read, or the parser's buffer.
Payload = Union[memoryview, bytearray]

READING = 1
QUEUED = 2
DISPATCHED = 3
WRITING = 4
CLOSED = 5

# The first recv of a connection reads up to this many bytes. A larger size
# makes the allocator map and unmap memory on every request.
FIRST_READ_SIZE = 64 * 1024
# Reads of one connection per wake-up, so one fast sender cannot starve others.
READ_BATCH = 16

# SO_LINGER on with a zero timeout: close() sends a reset and drops unsent data.
# The listener carries it, and accepted sockets inherit it, so a connection
# that dies with the process (SIGKILL, a crash) is reset, not closed cleanly:
# a FIN would read as a successful empty or truncated reply.
LINGER_RESET = struct.pack("ii", 1, 0)
LINGER_OFF = struct.pack("ii", 0, 0)

# Every call on a client socket is non-blocking by its flags, so an accepted
# socket need not be switched to non-blocking mode: that saves a system call
# per connection. No SIGPIPE when the client has gone: the send fails with
# EPIPE instead.
_RECV_FLAGS = socket.MSG_DONTWAIT
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class ClientClosed(Exception):
    """The client closed its side before the request was complete.

    ``mid_frame`` is False when it sent nothing at all.
    """

    def __init__(self, mid_frame: bool) -> None:
        super().__init__("client closed the connection mid-frame" if mid_frame else "client sent nothing")
        self.mid_frame = mid_frame


class Connection:
    """One client connection and the single request it carries.

    The socket may be in blocking mode: every call here passes MSG_DONTWAIT.
    """

    __slots__ = (
        "sock",
        "fd",
        "parser",
        "state",
        "request_id",
        "payload",
        "worker",
        "reply",
        "read_deadline",
        "write_deadline",
        "events",
        "counted",
        "held",
        "accepted_at",
    )

    def __init__(self, sock: socket.socket, accepted_at: float = 0.0) -> None:
        self.sock = sock
        # time.monotonic() at accept, for the latency histogram.
        self.accepted_at = accepted_at
        self.fd = sock.fileno()
        self.parser: Optional[FrameParser] = None
        self.state = READING
        self.request_id = 0
        # The request payload while QUEUED or DISPATCHED.
        self.payload: Optional[Payload] = None
        # The worker that holds the request while DISPATCHED.
        self.worker: Optional[WorkerProcess] = None
        # The rest of the reply while WRITING.
        self.reply: Optional[memoryview] = None
        self.read_deadline = 0.0
        # Reset when the client has not taken any reply bytes by then.
        self.write_deadline = 0.0
        # The selector events this connection is registered for; 0 when none.
        self.events = 0
        # Whether the request counts against the producer's in-flight limit:
        # from the moment its header is known until the connection closes.
        self.counted = False
        # Not read from, because the in-flight limit is reached; the read
        # timeout does not run meanwhile.
        self.held = False

    @property
    def header_known(self) -> bool:
        """Whether the request's length is known, so its body may be buffered."""
        return self.parser is not None and self.parser.frame_size >= 0

    def read_request(self, max_size: int) -> Optional[Payload]:
        """Read what the client has sent; return the payload once complete, else None.

        The first read takes up to FIRST_READ_SIZE bytes, so a small request
        arrives whole and skips the parser; later reads fill the buffer the
        parser sized from the header. Bytes after the frame are never read.

        Raises FrameTooLarge as soon as a header declares more than
        ``max_size`` bytes, ClientClosed at EOF, BlockingIOError when the
        socket has nothing more for now, and OSError when the client reset.
        """
        sock = self.sock
        if self.parser is None:
            data: Union[bytes, memoryview] = sock.recv(FIRST_READ_SIZE, _RECV_FLAGS)
            if not data:
                raise ClientClosed(mid_frame=False)
            if len(data) >= HEADER_SIZE:
                size = unpack_header(data)
                if size > max_size:
                    raise FrameTooLarge(size, max_size)
                end = HEADER_SIZE + size
                if len(data) >= end:
                    return memoryview(data)[HEADER_SIZE:end]
                data = memoryview(data)[:end]
            self.parser = FrameParser(max_size)
            self.parser.feed(data)

        parser = self.parser
        for _ in range(READ_BATCH):
            received = sock.recv_into(parser.get_buffer(), 0, _RECV_FLAGS)
            if received == 0:
                raise ClientClosed(mid_frame=True)
            parser.buffer_updated(received)
            payload = parser.next_frame()
            if payload is not None:
                self.parser = None
                return payload
        return None

    def send_reply(self) -> int:
        """Send as much of the reply as the socket takes; return the bytes still to send.

        Raises OSError (EPIPE, ECONNRESET) when the client has gone, and
        RuntimeError when no reply is set.
        """
        reply = self.reply
        if reply is None:
            raise RuntimeError(f"connection {self.fd} has no reply to send; set its reply first")
        try:
            sent = self.sock.send(reply, _SEND_FLAGS)
        except BlockingIOError:
            return len(reply)
        if sent == len(reply):
            self.reply = None
            return 0
        self.reply = reply[sent:]
        return len(reply) - sent

    def close(self) -> None:
        """Close after a complete reply, so the client reads a FIN.

        Bytes the client sent after its frame are not read, so Linux sends a
        reset for them: the protocol allows one request per connection.
        """
        sock = self.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
        except OSError:
            pass
        self._release()
        sock.close()

    def reset(self) -> None:
        """Close with a reset (RST): the protocol's signal that the request failed."""
        sock = self.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
        self._release()
        sock.close()

    def _release(self) -> None:
        self.state = CLOSED
        self.parser = None
        self.payload = None
        self.reply = None
        self.worker = None
