"""Length-prefixed framing of requests: the implementation gaspar uses.

``pack(message)`` frames a bytes-like message, ``unpack_header(buffer)``
reads the declared length from a header, and ``FrameParser`` splits a byte
stream into payloads. The wire format is described in gaspar/_constants.py.

Two implementations with the same API, results and exception messages
exist: the C core gaspar._framing (compiled from _framing.pyx) and its
pure-Python twin gaspar._framing_py. This module binds the C core when it can
be imported on CPython. It binds the twin when the environment variable
GASPAR_NO_EXTENSIONS is "1", on other interpreters, or when the extension was
not built. ``IMPLEMENTATION`` is "c" or "python" to say which one is live.
"""

import logging
import os
import platform
import types
from typing import TYPE_CHECKING

from gaspar import _framing_py

_implementation: types.ModuleType
if os.environ.get("GASPAR_NO_EXTENSIONS") == "1" or platform.python_implementation() != "CPython":
    _implementation = _framing_py
else:
    try:
        from gaspar import _framing as _implementation
    except ImportError as error:
        logging.getLogger(__name__).debug(
            "using the pure-Python framing because gaspar._framing failed to import: %s", error
        )
        _implementation = _framing_py

if TYPE_CHECKING:
    # Type checkers read one API, the pure-Python twin's. gaspar/_framing.pyi
    # declares the same API for the C core.
    from gaspar._framing_py import FrameParser, pack, unpack_header
else:
    pack = _implementation.pack
    unpack_header = _implementation.unpack_header
    FrameParser = _implementation.FrameParser
IMPLEMENTATION = "python" if _implementation is _framing_py else "c"

__all__ = ["IMPLEMENTATION", "FrameParser", "pack", "unpack_header"]
