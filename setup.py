"""Build script: compiles the Cython framing core.

The build fails loudly when the extension cannot be compiled, so a broken
toolchain never ships a silently slower package. Set GASPAR_NO_EXTENSIONS=1
to build the pure-Python package on purpose.
"""

import os

from setuptools import Extension, setup

if os.environ.get("GASPAR_NO_EXTENSIONS") == "1":
    print("gaspar: GASPAR_NO_EXTENSIONS=1, building the pure-Python package")
    ext_modules = []
else:
    from Cython.Build import cythonize

    print("gaspar: building the C framing extension gaspar._framing")
    ext_modules = cythonize(
        [Extension("gaspar._framing", ["gaspar/_framing.pyx"])],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
