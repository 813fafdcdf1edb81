"""gaspar: spread CPU-bound Python work over every core behind a tiny TCP daemon.

    consumer = gaspar.Consumer(handler=fn)
    gaspar.Producer(consumer, 10123).start()
"""

from gaspar import client
from gaspar.consumers import Consumer
from gaspar.errors import FrameError, FrameTooLarge, GasparError, RequestFailed, StartupError
from gaspar.producers import Producer
from gaspar.workers import Forker, WorkerProcess

__version__ = "2.0.0.dev0"

__all__ = [
    "Consumer",
    "Forker",
    "FrameError",
    "FrameTooLarge",
    "GasparError",
    "Producer",
    "RequestFailed",
    "StartupError",
    "WorkerProcess",
    "__version__",
    "client",
]
