"""Messages between the producer and its workers over 0MQ.

Every message starts with a 9-byte header: a kind byte and a 64-bit value
(``!BQ``). The value is the request id, except in READY, where it is the
worker id. A body below SPLIT_THRESHOLD travels in the same 0MQ frame as its
header, because one frame is cheaper than a two-part message for small
payloads. A larger body travels as a second frame sent without a copy, and
the kind byte then carries the MORE_FLAG bit.

    producer -> worker   REQUEST  request id   body: the request payload
    worker -> producer   READY    worker id    body: the worker's pid (!Q)
    worker -> producer   REPLY    request id   body: the handler's reply
    worker -> producer   FAILED   request id   body: empty (the handler raised)
    worker -> producer   STOPPING worker id    body: empty (it received SIGTERM)
    producer -> worker   STOP     0            body: empty (exit after the requests before this)

A worker sets RECYCLE_FLAG in the kind of a REPLY or FAILED to ask to be
replaced, because it went over its memory limit.
"""

from __future__ import annotations

import struct
from typing import Tuple, Union

import zmq

HEADER = struct.Struct("!BQ")
HEADER_SIZE = HEADER.size
PID = struct.Struct("!Q")

REQUEST = 1
READY = 2
REPLY = 3
FAILED = 4
STOPPING = 5
STOP = 6

MORE_FLAG = 0x80
RECYCLE_FLAG = 0x40
KIND_MASK = 0x7F

# Bodies at or above this size go in a second frame, sent without a copy.
SPLIT_THRESHOLD = 64 * 1024


def send_message(
    socket: zmq.Socket[bytes], kind: int, value: int, body: Union[bytes, bytearray, memoryview] = b""
) -> None:
    """Send one message on a 0MQ socket without blocking.

    Raises zmq.Again when the socket cannot queue the message.
    """
    if len(body) < SPLIT_THRESHOLD:
        socket.send(HEADER.pack(kind, value) + body, zmq.NOBLOCK)
    else:
        socket.send(HEADER.pack(kind | MORE_FLAG, value), zmq.NOBLOCK | zmq.SNDMORE)
        socket.send(body, zmq.NOBLOCK, copy=False)


def receive_message(socket: zmq.Socket[bytes], block: bool = False) -> Tuple[int, int, memoryview]:
    """Receive one message: return (kind, value, body).

    ``body`` is a memoryview. Without ``block``, raises zmq.Again when no
    message is waiting.
    """
    first = socket.recv(0 if block else zmq.NOBLOCK)
    kind, value = HEADER.unpack_from(first)
    if kind & MORE_FLAG:
        # The second part of a two-part message is already queued by 0MQ,
        # which delivers multi-part messages atomically.
        frame = socket.recv(zmq.NOBLOCK, copy=False)
        return kind & KIND_MASK, value, frame.buffer
    return kind, value, memoryview(first)[HEADER_SIZE:]
