"""Protocol facts shared by both framing implementations and the daemon.

Wire format of one request (protocol version 1)::

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |          payload length N (unsigned, big-endian)              |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                 N bytes of payload ...                        |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The reply is the handler's bytes with no prefix, ended by the server closing
the connection. A failed request ends in a reset connection instead.
"""

HEADER_FORMAT = "!I"
HEADER_SIZE = 4

# The largest length the 4-byte header can express.
MAX_FRAME_SIZE = 0xFFFFFFFF

# Default limit on one request's payload, in bytes (64 MiB).
DEFAULT_MAX_REQUEST_SIZE = 64 * 1024 * 1024
