"""Pure-Python framing: the twin of the C core in gaspar/_framing.pyx.

Both modules have the same API and raise the same exception types with the
same messages. tests/test_framing.py checks that they agree. gaspar.framing
picks one of them at import time. The wire format is described in
gaspar/_constants.py.
"""

from __future__ import annotations

import struct
from collections import deque
from pickle import PickleBuffer
from typing import TYPE_CHECKING

from gaspar._constants import DEFAULT_MAX_REQUEST_SIZE, HEADER_FORMAT, HEADER_SIZE, MAX_FRAME_SIZE
from gaspar.errors import FrameError, FrameTooLarge

if TYPE_CHECKING:
    # Only type checkers import typing_extensions, which gaspar does not
    # depend on. collections.abc.Buffer is new in Python 3.12.
    from typing_extensions import Buffer, Self

__all__ = ["FrameParser", "pack", "unpack_header"]

_HEADER = struct.Struct(HEADER_FORMAT)

_UNUSABLE_MESSAGE = "parser is unusable after an earlier error"


def _byte_view(obj: Buffer, name: str) -> memoryview:
    """Return a flat unsigned-byte view of a bytes-like object, without copying.

    ``name`` is the argument name used in error messages. Raises TypeError for
    str and for objects without the buffer protocol, and BufferError for
    buffers that are not C-contiguous.
    """
    if isinstance(obj, str):
        raise TypeError(f"{name} must be a bytes-like object, not str. Encode the text to bytes first.")
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object, not {type(obj).__name__}") from None
    if not view.c_contiguous:
        view.release()
        raise BufferError(
            f"{name} must be a C-contiguous buffer, not a non-contiguous {type(obj).__name__}. "
            "Copy it with bytes() first."
        )
    if view.ndim == 1 and view.format == "B":
        return view
    # PickleBuffer.raw() flattens any contiguous buffer, whatever its item format
    # and shape, to unsigned bytes without copying.
    return PickleBuffer(view).raw()


def _check_int(value: object, name: str) -> None:
    # bool is an int subclass, but True as a size is almost surely a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def pack(message: Buffer) -> bytes:
    """Return ``message`` framed: its 4-byte big-endian length, then its bytes.

    ``message`` is any C-contiguous bytes-like object. A str raises TypeError,
    because no text encoding is assumed. A message longer than MAX_FRAME_SIZE
    raises FrameTooLarge.
    """
    with _byte_view(message, "message") as view:
        size = view.nbytes
        if size > MAX_FRAME_SIZE:
            raise FrameTooLarge(size, MAX_FRAME_SIZE)
        return _HEADER.pack(size) + view


def unpack_header(buffer: Buffer) -> int:
    """Return the payload length declared by the first 4 bytes of ``buffer``.

    Bytes after the header are ignored. Fewer than 4 bytes raise FrameError.
    """
    with _byte_view(buffer, "buffer") as view:
        if view.nbytes < HEADER_SIZE:
            raise FrameError(f"frame header needs {HEADER_SIZE} bytes, got {view.nbytes}")
        size: int = _HEADER.unpack_from(view)[0]
        return size


class FrameParser:
    """Incremental parser that splits a byte stream into frame payloads.

    Data arrives through ``feed()`` or, without a copy, through the
    ``get_buffer()``/``buffer_updated()`` pair that asyncio.BufferedProtocol
    uses, and the two may be mixed. Complete payloads come out as bytearray
    objects, in order, from ``next_frame()`` or by iterating the parser.

    A declared length above ``max_size`` raises FrameTooLarge as soon as the
    header is complete, before the body is allocated. After that error every
    ``feed()``, ``get_buffer()`` and ``buffer_updated()`` call raises
    FrameError. Payloads completed before the error can still be read.
    """

    __slots__ = (
        "_max_size",
        "_header",
        "_header_filled",
        "_frame_size",
        "_body",
        "_body_filled",
        "_frames",
        "_view_size",
        "_broken",
    )

    def __init__(self, max_size: int = DEFAULT_MAX_REQUEST_SIZE) -> None:
        _check_int(max_size, "max_size")
        if not 0 <= max_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_size must be between 0 and {MAX_FRAME_SIZE}, got {max_size}")
        self._max_size = max_size
        # Header bytes of the current frame, filled while _frame_size is -1.
        self._header = bytearray(HEADER_SIZE)
        self._header_filled = 0
        # Declared length of the current frame, or -1 until its header is complete.
        self._frame_size = -1
        # Body buffer of the current frame, allocated once with the declared
        # length, and empty while no body is being received.
        self._body = bytearray()
        self._body_filled = 0
        self._frames: deque[bytearray] = deque()
        # Length of the view that the last get_buffer() returned, or -1 when no
        # view is waiting for its buffer_updated() call.
        self._view_size = -1
        self._broken = False

    @property
    def max_size(self) -> int:
        """Largest payload length accepted, in bytes."""
        return self._max_size

    @property
    def buffered(self) -> int:
        """Bytes held of the incomplete frame, header included, or 0 at a frame boundary."""
        if self._frame_size < 0:
            return self._header_filled
        return HEADER_SIZE + self._body_filled

    @property
    def frame_size(self) -> int:
        """Declared payload length of the incomplete frame, or -1 until its header is complete."""
        return self._frame_size

    def feed(self, data: Buffer) -> None:
        """Consume a bytes-like chunk of any length and queue every payload it completes."""
        self._check_usable()
        self._view_size = -1
        with _byte_view(data, "data") as view:
            self._consume(view)

    def get_buffer(self) -> memoryview:
        """Return a writable view of the bytes still missing from the current header or body.

        The view is never empty. Write into it (``sock.recv_into(view)``) and
        then report the count with ``buffer_updated()``.
        """
        self._check_usable()
        if self._frame_size < 0:
            view = memoryview(self._header)[self._header_filled :]
        else:
            view = memoryview(self._body)[self._body_filled :]
        self._view_size = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` bytes written into the view from the last ``get_buffer()``."""
        self._check_usable()
        _check_int(nbytes, "nbytes")
        if self._view_size < 0:
            raise FrameError("no get_buffer() view is waiting for an update. Call get_buffer() first.")
        if not 0 <= nbytes <= self._view_size:
            raise ValueError(
                f"nbytes must be between 0 and {self._view_size}, "
                f"the length of the last get_buffer() view, got {nbytes}"
            )
        self._view_size = -1

        if self._frame_size < 0:
            self._header_filled += nbytes
            if self._header_filled == HEADER_SIZE:
                self._header_filled = 0
                self._start_frame(_HEADER.unpack(self._header)[0])
                if self._frame_size > 0:
                    self._body = bytearray(self._frame_size)
            return

        self._body_filled += nbytes
        if self._body_filled == self._frame_size:
            self._finish_body()

    def next_frame(self) -> bytearray | None:
        """Remove and return the oldest complete payload, or None if there is none."""
        if self._frames:
            return self._frames.popleft()
        return None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytearray:
        if self._frames:
            return self._frames.popleft()
        raise StopIteration

    def _check_usable(self) -> None:
        if self._broken:
            raise FrameError(_UNUSABLE_MESSAGE)

    def _start_frame(self, size: int) -> None:
        """Begin a frame of declared length ``size``, raising FrameTooLarge above max_size.

        A zero-length frame completes at once. For a longer one the caller
        allocates the body buffer.
        """
        self._frame_size = size
        if size > self._max_size:
            self._broken = True
            raise FrameTooLarge(size, self._max_size)
        if size == 0:
            self._frames.append(bytearray())
            self._frame_size = -1

    def _finish_body(self) -> None:
        self._frames.append(self._body)
        self._body = bytearray()
        self._body_filled = 0
        self._frame_size = -1

    def _consume(self, view: memoryview) -> None:
        # Every step moves `position` forward, and each input byte is copied at
        # most once, so the work is linear in len(view).
        position = 0
        end = view.nbytes
        while position < end:
            if self._frame_size < 0:
                if self._header_filled == 0 and end - position >= HEADER_SIZE:
                    size = _HEADER.unpack_from(view, position)[0]
                    position += HEADER_SIZE
                else:
                    count = min(HEADER_SIZE - self._header_filled, end - position)
                    start = self._header_filled
                    self._header[start : start + count] = view[position : position + count]
                    self._header_filled += count
                    position += count
                    if self._header_filled < HEADER_SIZE:
                        return
                    self._header_filled = 0
                    size = _HEADER.unpack(self._header)[0]

                self._start_frame(size)
                if size == 0:
                    continue
                if end - position >= size:
                    # The whole body is here: copy it out in one step.
                    self._frames.append(bytearray(view[position : position + size]))
                    self._frame_size = -1
                    position += size
                else:
                    self._body = bytearray(size)
                continue

            count = min(self._frame_size - self._body_filled, end - position)
            start = self._body_filled
            self._body[start : start + count] = view[position : position + count]
            self._body_filled += count
            position += count
            if self._body_filled == self._frame_size:
                self._finish_body()
