"""Consumer: the request handler that runs in each worker process."""

from __future__ import annotations

from typing import Callable, Optional, Union

Reply = Union[bytes, bytearray, memoryview, str]
Handler = Callable[[bytes], Reply]


class Consumer:
    """The code that turns one request into one reply.

    Pass ``handler=fn``, where ``fn(message: bytes)`` returns bytes, bytearray,
    memoryview or str (sent as UTF-8), or subclass and override ``handle``.
    The consumer is built in the producer's process and reaches each worker
    through ``fork()``, so closures and lambdas work and nothing is pickled.
    An exception from the handler fails that request only: the client sees a
    reset connection and the worker logs the traceback and keeps serving.
    """

    def __init__(self, handler: Optional[Handler] = None) -> None:
        overrides_handle = type(self).handle is not Consumer.handle
        if handler is None and not overrides_handle:
            raise TypeError(
                "Consumer needs a handler: pass handler=fn or subclass Consumer and override handle()"
            )
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self.handler = handler

    def setup(self) -> None:
        """Prepare one worker; runs once in each worker after the fork.

        Override it to open connections or load data that must not be shared
        across processes. An exception here stops the worker before it takes
        any request, and the producer reports it.
        """

    def reloaded(self) -> "Consumer":
        """Return the consumer that a worker started by a reload (SIGHUP) uses.

        Runs in the new worker, after the fork. The base class returns itself;
        ``gaspar serve`` returns a consumer from a fresh import of the handler's
        module, so new code goes live without a restart.
        """
        return self

    def handle(self, message: bytes) -> Reply:
        """Return the reply to one request."""
        if self.handler is None:
            raise NotImplementedError("override handle() or pass handler=fn to Consumer")
        return self.handler(message)

    def __repr__(self) -> str:
        if self.handler is None:
            return f"<{type(self).__name__}>"
        name = getattr(self.handler, "__qualname__", repr(self.handler))
        return f"<{type(self).__name__} handler={name}>"


def as_consumer(target: Union[Consumer, Handler]) -> Consumer:
    """Return ``target`` if it is a Consumer, else wrap the callable in one."""
    if isinstance(target, Consumer):
        return target
    if callable(target):
        return Consumer(handler=target)
    raise TypeError(
        f"expected a gaspar.Consumer or a callable handler, got {type(target).__name__}"
    )


def reply_to_buffer(reply: object) -> Union[bytes, bytearray, memoryview]:
    """Convert a handler's return value to a byte buffer.

    Raises TypeError naming the type when the handler returned anything but
    bytes, bytearray, memoryview or str.
    """
    if isinstance(reply, (bytes, bytearray)):
        return reply
    if isinstance(reply, str):
        return reply.encode("utf-8")
    if isinstance(reply, memoryview):
        # A memoryview of another format counts items, not bytes.
        return reply if reply.format == "B" and reply.contiguous else memoryview(reply.tobytes())
    raise TypeError(
        f"handler returned {type(reply).__name__}; expected bytes, bytearray, memoryview or str"
    )
