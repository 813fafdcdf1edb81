"""Shared pytest fixtures."""

import importlib
import os

import pytest


@pytest.fixture(params=["python", "c"])
def framing(request):
    """Return each framing implementation module: the pure-Python twin, then the C core.

    A missing C core fails the test, so CI cannot pass without building it,
    unless GASPAR_NO_EXTENSIONS=1 marks a pure-Python build as intended.
    """
    if request.param == "python":
        return importlib.import_module("gaspar._framing_py")
    try:
        return importlib.import_module("gaspar._framing")
    except ImportError as error:
        if os.environ.get("GASPAR_NO_EXTENSIONS") == "1":
            pytest.skip(f"GASPAR_NO_EXTENSIONS=1 and the C core gaspar._framing is not built ({error})")
        pytest.fail(
            f"the C extension gaspar._framing was not built ({error}). Build it with "
            "`pip install .` or `python setup.py build_ext --inplace`, or set "
            "GASPAR_NO_EXTENSIONS=1 to test only the pure-Python implementation."
        )
