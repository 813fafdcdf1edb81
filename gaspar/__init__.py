"""gaspar: spread CPU-bound Python work over every core behind a tiny TCP daemon."""

from gaspar.errors import FrameError, FrameTooLarge, GasparError, RequestFailed, StartupError

__version__ = "2.0.0.dev0"

__all__ = [
    "FrameError",
    "FrameTooLarge",
    "GasparError",
    "RequestFailed",
    "StartupError",
    "__version__",
]
