# cython: language_level=3
# cython: boundscheck=False
# cython: wraparound=False
# cython: auto_pickle=False
"""C framing core, compiled with Cython. gaspar/_framing_py.py is its pure-Python twin.

Both modules have the same API and raise the same exception types with the
same messages. tests/test_framing.py checks that they agree. gaspar.framing
picks one of them at import time. The wire format is described in
gaspar/_constants.py.
"""

from cpython.buffer cimport (
    PyBUF_FULL_RO,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memcpy

from gaspar._constants import DEFAULT_MAX_REQUEST_SIZE, HEADER_FORMAT, HEADER_SIZE, MAX_FRAME_SIZE
from gaspar.errors import FrameError, FrameTooLarge

__all__ = ["FrameParser", "pack", "unpack_header"]

# The code below reads and writes the header as a 4-byte unsigned big-endian
# integer, so the import fails if gaspar._constants defines another header.
if HEADER_FORMAT != "!I" or HEADER_SIZE != 4 or MAX_FRAME_SIZE != 0xFFFFFFFF:
    raise ImportError(
        "gaspar._framing expects a 4-byte big-endian header ('!I', max 0xFFFFFFFF), but "
        f"gaspar._constants sets HEADER_FORMAT={HEADER_FORMAT!r}, HEADER_SIZE={HEADER_SIZE}, "
        f"MAX_FRAME_SIZE={MAX_FRAME_SIZE}. Update gaspar/_framing.pyx to match."
    )

# C copies of the constants, so the hot loops do not look up Python globals.
cdef Py_ssize_t _HEADER_SIZE = HEADER_SIZE
cdef unsigned long long _MAX_FRAME_SIZE = MAX_FRAME_SIZE

_UNUSABLE_MESSAGE = "parser is unusable after an earlier error"

# Completed payloads are kept in a list read from _frames_head onwards. Once
# this many read slots have piled up and they are at least half the list, the
# list drops them, so reading stays amortised O(1) per payload.
cdef Py_ssize_t _COMPACT_THRESHOLD = 1024


cdef inline uint32_t _read_be32(const unsigned char* data) noexcept nogil:
    return (
        (<uint32_t>data[0] << 24)
        | (<uint32_t>data[1] << 16)
        | (<uint32_t>data[2] << 8)
        | <uint32_t>data[3]
    )


cdef inline void _write_be32(unsigned char* data, uint32_t value) noexcept nogil:
    data[0] = <unsigned char>(value >> 24)
    data[1] = <unsigned char>(value >> 16)
    data[2] = <unsigned char>(value >> 8)
    data[3] = <unsigned char>value


cdef int _acquire(object obj, Py_buffer* view, str name) except -1:
    """Fill ``view`` with the buffer of a C-contiguous bytes-like object.

    The flags match a Python memoryview(), so both implementations accept the
    same objects. The caller releases ``view`` with PyBuffer_Release.
    """
    if isinstance(obj, str):
        raise TypeError(f"{name} must be a bytes-like object, not str. Encode the text to bytes first.")
    if not PyObject_CheckBuffer(obj):
        raise TypeError(f"{name} must be a bytes-like object, not {type(obj).__name__}")
    PyObject_GetBuffer(obj, view, PyBUF_FULL_RO)
    if not PyBuffer_IsContiguous(view, b"C"):
        PyBuffer_Release(view)
        raise BufferError(
            f"{name} must be a C-contiguous buffer, not a non-contiguous {type(obj).__name__}. "
            "Copy it with bytes() first."
        )
    return 0


cdef int _check_int(object value, str name) except -1:
    # bool is an int subclass, but True as a size is almost surely a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return 0


def pack(message):
    """Return ``message`` framed: its 4-byte big-endian length, then its bytes.

    ``message`` is any C-contiguous bytes-like object. A str raises TypeError,
    because no text encoding is assumed. A message longer than MAX_FRAME_SIZE
    raises FrameTooLarge. The result is built with one allocation and one copy.
    """
    cdef Py_buffer view
    cdef bytes frame
    cdef unsigned char* out
    _acquire(message, &view, "message")
    try:
        if <unsigned long long>view.len > _MAX_FRAME_SIZE:
            raise FrameTooLarge(view.len, MAX_FRAME_SIZE)
        frame = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + view.len)
        out = <unsigned char*>PyBytes_AS_STRING(frame)
        _write_be32(out, <uint32_t>view.len)
        memcpy(out + _HEADER_SIZE, view.buf, view.len)
        return frame
    finally:
        PyBuffer_Release(&view)


def unpack_header(buffer):
    """Return the payload length declared by the first 4 bytes of ``buffer``.

    Bytes after the header are ignored. Fewer than 4 bytes raise FrameError.
    """
    cdef Py_buffer view
    _acquire(buffer, &view, "buffer")
    try:
        if view.len < _HEADER_SIZE:
            raise FrameError(f"frame header needs {_HEADER_SIZE} bytes, got {view.len}")
        return _read_be32(<const unsigned char*>view.buf)
    finally:
        PyBuffer_Release(&view)


cdef inline bytearray _new_body(Py_ssize_t size):
    # The bytes start uninitialised, unlike bytearray(size) in the Python twin,
    # to skip zeroing up to max_size bytes. feed() writes every byte before the
    # payload is queued. On the get_buffer() path buffer_updated() trusts the
    # caller that the counted bytes were written, as recv_into() does.
    return PyByteArray_FromStringAndSize(NULL, size)


cdef class FrameParser:
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

    cdef uint32_t _max_size
    # Header bytes of the current frame, filled while _frame_size is -1.
    cdef bytearray _header
    cdef Py_ssize_t _header_filled
    # Declared length of the current frame, or -1 until its header is complete.
    cdef int64_t _frame_size
    # Body buffer of the current frame, allocated once with the declared length.
    cdef bytearray _body
    cdef Py_ssize_t _body_filled
    # Completed payloads. The unread ones are _frames[_frames_head:].
    cdef list _frames
    cdef Py_ssize_t _frames_head
    # Length of the view that the last get_buffer() returned, or -1 when no
    # view is waiting for its buffer_updated() call.
    cdef Py_ssize_t _view_size
    cdef bint _broken

    def __cinit__(self, *args, **kwargs):
        # __cinit__ runs even when __init__ does not (FrameParser.__new__), so
        # the objects whose C pointers the methods take are never None.
        self._header = bytearray(_HEADER_SIZE)
        self._frames = []
        self._frame_size = -1
        self._view_size = -1
        self._max_size = DEFAULT_MAX_REQUEST_SIZE

    def __init__(self, max_size=DEFAULT_MAX_REQUEST_SIZE):
        _check_int(max_size, "max_size")
        if not 0 <= max_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_size must be between 0 and {MAX_FRAME_SIZE}, got {max_size}")
        self._max_size = max_size
        self._header_filled = 0
        self._frame_size = -1
        self._body = None
        self._body_filled = 0
        self._frames = []
        self._frames_head = 0
        self._view_size = -1
        self._broken = False

    @property
    def max_size(self):
        """Largest payload length accepted, in bytes."""
        return self._max_size

    @property
    def buffered(self):
        """Bytes held of the incomplete frame, header included, or 0 at a frame boundary."""
        if self._frame_size < 0:
            return self._header_filled
        return _HEADER_SIZE + self._body_filled

    @property
    def frame_size(self):
        """Declared payload length of the incomplete frame, or -1 until its header is complete."""
        return self._frame_size

    def feed(self, data):
        """Consume a bytes-like chunk of any length and queue every payload it completes."""
        cdef Py_buffer view
        self._check_usable()
        self._view_size = -1
        _acquire(data, &view, "data")
        try:
            self._consume(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def get_buffer(self):
        """Return a writable view of the bytes still missing from the current header or body.

        The view is never empty. Write into it (``sock.recv_into(view)``) and
        then report the count with ``buffer_updated()``.
        """
        self._check_usable()
        if self._frame_size < 0:
            view = memoryview(self._header)[self._header_filled:]
        else:
            view = memoryview(self._body)[self._body_filled:]
        self._view_size = len(view)
        return view

    def buffer_updated(self, nbytes):
        """Account for ``nbytes`` bytes written into the view from the last ``get_buffer()``."""
        cdef Py_ssize_t count
        self._check_usable()
        _check_int(nbytes, "nbytes")
        if self._view_size < 0:
            raise FrameError("no get_buffer() view is waiting for an update. Call get_buffer() first.")
        if not 0 <= nbytes <= self._view_size:
            raise ValueError(
                f"nbytes must be between 0 and {self._view_size}, "
                f"the length of the last get_buffer() view, got {nbytes}"
            )
        count = nbytes
        self._view_size = -1

        if self._frame_size < 0:
            self._header_filled += count
            if self._header_filled == _HEADER_SIZE:
                self._header_filled = 0
                self._start_frame(_read_be32(<const unsigned char*>PyByteArray_AS_STRING(self._header)))
                if self._frame_size > 0:
                    self._body = _new_body(self._frame_size)
            return

        self._body_filled += count
        if self._body_filled == self._frame_size:
            self._finish_body()

    def next_frame(self):
        """Remove and return the oldest complete payload, or None if there is none."""
        if self._frames_head == len(self._frames):
            return None
        return self._pop_frame()

    def __iter__(self):
        return self

    def __next__(self):
        if self._frames_head == len(self._frames):
            raise StopIteration
        return self._pop_frame()

    cdef inline int _check_usable(self) except -1:
        if self._broken:
            raise FrameError(_UNUSABLE_MESSAGE)
        return 0

    cdef object _pop_frame(self):
        cdef object frame = self._frames[self._frames_head]
        self._frames[self._frames_head] = None
        self._frames_head += 1
        if self._frames_head == len(self._frames):
            del self._frames[:]
            self._frames_head = 0
        elif self._frames_head >= _COMPACT_THRESHOLD and 2 * self._frames_head >= len(self._frames):
            del self._frames[:self._frames_head]
            self._frames_head = 0
        return frame

    cdef int _start_frame(self, uint32_t size) except -1:
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
        return 0

    cdef int _finish_body(self) except -1:
        self._frames.append(self._body)
        self._body = None
        self._body_filled = 0
        self._frame_size = -1
        return 0

    cdef int _consume(self, const unsigned char* data, Py_ssize_t length) except -1:
        # Every step moves `position` forward, and each input byte is copied at
        # most once, so the work is linear in `length`.
        cdef Py_ssize_t position = 0
        cdef Py_ssize_t count
        cdef uint32_t size
        cdef unsigned char* header = <unsigned char*>PyByteArray_AS_STRING(self._header)

        while position < length:
            if self._frame_size < 0:
                if self._header_filled == 0 and length - position >= _HEADER_SIZE:
                    size = _read_be32(data + position)
                    position += _HEADER_SIZE
                else:
                    count = min(_HEADER_SIZE - self._header_filled, length - position)
                    memcpy(header + self._header_filled, data + position, count)
                    self._header_filled += count
                    position += count
                    if self._header_filled < _HEADER_SIZE:
                        return 0
                    self._header_filled = 0
                    size = _read_be32(header)

                self._start_frame(size)
                if size == 0:
                    continue
                if length - position >= size:
                    # The whole body is here: copy it out in one step.
                    self._frames.append(PyByteArray_FromStringAndSize(<const char*>(data + position), size))
                    self._frame_size = -1
                    position += size
                else:
                    self._body = _new_body(size)
                continue

            count = min(<Py_ssize_t>(self._frame_size - self._body_filled), length - position)
            memcpy(PyByteArray_AS_STRING(self._body) + self._body_filled, data + position, count)
            self._body_filled += count
            position += count
            if self._body_filled == self._frame_size:
                self._finish_body()
        return 0
