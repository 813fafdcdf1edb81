"""Exceptions raised by gaspar.

Framing errors subclass ValueError and request failures subclass
ConnectionError, so callers that already catch those keep working.
"""


class GasparError(Exception):
    """Base class of every exception gaspar raises on purpose."""


class FrameError(GasparError, ValueError):
    """A frame is malformed or the framing API was called incorrectly."""


class FrameTooLarge(FrameError):
    """A frame's declared payload length exceeds the allowed maximum.

    ``size`` is the declared length and ``max_size`` the limit, both in bytes.
    """

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(
            f"frame of {size} bytes exceeds the maximum of {max_size} bytes",
            size,
            max_size,
        )
        self.size = size
        self.max_size = max_size

    def __str__(self) -> str:
        message: str = self.args[0]
        return message


class RequestFailed(GasparError, ConnectionError):
    """The server reset the connection instead of replying.

    The server signals every failed request this way: the handler raised, its
    worker died or timed out, the request was too large, or the server was
    shutting down. ``address`` is the server's "host:port".
    """

    def __init__(self, address: str, reason: str = "server reset the connection") -> None:
        super().__init__(f"request to {address} failed: {reason}")
        self.address = address
        self.reason = reason


class StartupError(GasparError, RuntimeError):
    """The daemon could not start: the port is taken, or a worker failed to boot."""
