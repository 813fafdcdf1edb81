"""Build the C load generator and the C echo server with the system C compiler."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE_DIR = Path(__file__).resolve().parent / "c"
CFLAGS = ["-O2", "-Wall", "-Wextra"]
COMPILE_TIMEOUT_SECONDS = 120


class CompilerNotFound(RuntimeError):
    """No C compiler: neither $CC nor cc is on PATH."""


@dataclass(frozen=True)
class NativeTools:
    """Paths of the compiled programs and the compiler that built them."""

    loadgen: Path
    echo_server: Path
    compiler: str


def find_compiler() -> Optional[str]:
    """Return the C compiler command ($CC, else cc), or None when it is not on PATH."""
    compiler = os.environ.get("CC", "cc")
    executable = shlex.split(compiler)[0] if compiler.strip() else ""
    return compiler if executable and shutil.which(executable) else None


def compiler_version(compiler: str) -> str:
    """Return the first line of ``compiler --version``, or "unknown"."""
    try:
        output = subprocess.run(
            shlex.split(compiler) + ["--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return "unknown"
    return output.splitlines()[0] if output else "unknown"


def build(build_dir: Path) -> NativeTools:
    """Compile loadgen.c and echo_server.c into ``build_dir``.

    Raises CompilerNotFound without a compiler, and RuntimeError with the
    compiler's output when a build fails.
    """
    compiler = find_compiler()
    if compiler is None:
        raise CompilerNotFound(
            "no C compiler found: install cc (gcc or clang) or set CC; the load generator "
            "and the C echo server are compiled at run time"
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    programs = {}
    for name in ("loadgen", "echo_server"):
        output = build_dir / name
        command = shlex.split(compiler) + CFLAGS + ["-o", str(output), str(SOURCE_DIR / f"{name}.c")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_SECONDS, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {name}.c failed: {shlex.join(command)}\n{result.stderr}")
        programs[name] = output
    return NativeTools(loadgen=programs["loadgen"], echo_server=programs["echo_server"], compiler=compiler)
