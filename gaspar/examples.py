"""Ready-made handlers, for trying gaspar out and for benchmarks.

Serve one with ``gaspar serve gaspar.examples:scrypt_hash``.
"""

import hashlib
import zlib

SCRYPT_SALT = b"gaspar-example-salt"


def echo(message: bytes) -> bytes:
    """Return the request unchanged."""
    return message


def scrypt_hash(password: bytes) -> bytes:
    """Return the hex scrypt digest of the request (about 50 ms of CPU, 16 MiB of memory).

    Password hashing is the classic CPU-bound step that stalls a web
    service's event loop. A real service would use a random salt per user.
    """
    digest = hashlib.scrypt(password, salt=SCRYPT_SALT, n=2**14, r=8, p=1)
    return digest.hex().encode("ascii")


def compress(data: bytes) -> bytes:
    """Return the request compressed with zlib at level 9."""
    return zlib.compress(data, 9)
