"""Claim records: the requests a worker has started, shared between the worker and the producer.

A worker may hold several requests: the one it runs and the ones queued
behind it in its 0MQ socket. The producer can take a queued request back
only while the worker has not started it, and after a worker dies it must
tell the requests the handler may have run from those it never reached.
0MQ has no way to recall a message, so each worker keeps a claim record:
a small file, mapped into memory by both processes, that contains two
request ids.

- ``started``: the last request the worker claimed. The worker claims each
  request, in the order they were sent to it, before its handler runs.
- ``revoked``: the producer's mark. The worker skips every request whose id
  is at or below it and that it has not claimed.

Claiming and revoking each take an exclusive flock() on the file, so a
request is either claimed by the worker or revoked by the producer, never
both. Linux releases the lock when a process dies, and the mapped values
stay in the file, so the producer can read ``started`` after a crash.

The record also keeps a copy of the worker's last reply, up to
KEPT_REPLY_SIZE bytes. A crash can catch a reply still inside the worker's
0MQ I/O thread; the producer then takes the reply from here instead.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import Optional, Tuple, Union

# The largest reply the record keeps a copy of, in bytes.
KEPT_REPLY_SIZE = 64 * 1024

# started, revoked, then the kept reply's request id and length, then its bytes.
_RECORD = struct.Struct("=QQQQ")
_STARTED_AT = 0
_REVOKED_AT = 8
_KEPT_ID_AT = 16
_KEPT_SIZE_AT = 24
_SIZE = _RECORD.size + KEPT_REPLY_SIZE


class ClaimRecord:
    """One worker's claim record, open in the worker or in the producer."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._map: Optional[mmap.mmap] = mmap.mmap(fd, _SIZE)

    @classmethod
    def create(cls, path: str) -> "ClaimRecord":
        """Create the record with nothing started or revoked; the worker calls this before READY.

        Raises OSError when the file cannot be created.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str) -> "ClaimRecord":
        """Open a record that a worker created. Raises OSError when it is missing."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @property
    def started(self) -> int:
        """The id of the last request the worker claimed, or 0 before its first."""
        return self._read(_STARTED_AT)

    def claim(self, request_id: int) -> bool:
        """Mark ``request_id`` as started; return False when the producer revoked it first.

        Called by the worker before the handler runs on the request.
        """
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if request_id <= self._read(_REVOKED_AT):
                return False
            self._write(_STARTED_AT, request_id)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def revoke_through(self, request_id: int) -> Optional[int]:
        """Revoke every unclaimed request with an id at or below ``request_id``; return ``started``.

        Called by the producer. The requests queued at the worker with an id
        above the returned value, and at or below ``request_id``, will never
        run there. Returns None, revoking nothing, when the worker holds the
        lock at this moment: the producer must not wait for a worker.
        """
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            if request_id > self._read(_REVOKED_AT):
                self._write(_REVOKED_AT, request_id)
            return self._read(_STARTED_AT)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def keep_reply(self, request_id: int, reply: Union[bytes, bytearray, memoryview]) -> bool:
        """Keep a copy of the reply to ``request_id``; return False when it is too large to keep.

        Called by the worker before it sends the reply. Only the producer
        reads it, after the worker died, so no lock is needed.
        """
        size = len(reply)
        if size > KEPT_REPLY_SIZE:
            return False
        if self._map is None:
            raise ValueError(f"claim record {self.path} is closed")
        # The id goes last, so a crash in between leaves no id with a half-written reply.
        self._write(_KEPT_ID_AT, 0)
        self._map[_RECORD.size : _RECORD.size + size] = reply
        self._write(_KEPT_SIZE_AT, size)
        self._write(_KEPT_ID_AT, request_id)
        return True

    def kept_reply(self) -> Tuple[int, bytes]:
        """Return (request id, reply) of the last reply kept, or (0, b"") when none is."""
        if self._map is None:
            raise ValueError(f"claim record {self.path} is closed")
        request_id = self._read(_KEPT_ID_AT)
        if request_id == 0:
            return 0, b""
        size = self._read(_KEPT_SIZE_AT)
        return request_id, bytes(self._map[_RECORD.size : _RECORD.size + size])

    def close(self, unlink: bool = False) -> None:
        """Close the record; with ``unlink``, remove its file too."""
        if self._map is None:
            return
        self._map.close()
        self._map = None
        os.close(self._fd)
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _read(self, offset: int) -> int:
        if self._map is None:
            raise ValueError(f"claim record {self.path} is closed")
        value: int = struct.unpack_from("=Q", self._map, offset)[0]
        return value

    def _write(self, offset: int, value: int) -> None:
        if self._map is None:
            raise ValueError(f"claim record {self.path} is closed")
        struct.pack_into("=Q", self._map, offset, value)
