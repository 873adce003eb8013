"""Build and load the C++ CPU kernels (csrc/cpu_int_matmul.cpp: the fused matmuls and the
dequantization, of integer codes, FP8 and NF4 weights) with the machine's C++ compiler.

The source ships inside the package; the first call in a fresh cache compiles it (8 s on a 2-core
machine) into
`<cache>/kernels/` (`COMPRESS_CACHE`, default ~/.cache/compress), named by a hash of the source,
the compiler's command and flags, its version and the CPU, since `-march=native` code may not run
on another CPU. Written under a temporary name and renamed, so a concurrent or interrupted build never leaves
half a library behind. It is loaded with ctypes, which releases the GIL during the call.

Flags are tried from the fastest down: `-march=native` and OpenMP (the kernel's threads), then
each alone (Apple's clang has no OpenMP), then neither; a library cached for any of them is used
before anything is compiled. Where none compiles (no compiler, Windows), or loading fails,
`library()` returns None and `failure()` says why; callers run the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ..models import cache_dir

SOURCE = "cpu_int_matmul.cpp"
_FLAGS = (["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast"],  # base, then the optional ones
          ["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])

_library: ctypes.CDLL | None = None
_failure: str | None = None


def _cpu() -> str:
    """What the compiled code depends on: the machine and the CPU's model and features (Linux:
    /proc/cpuinfo; elsewhere what the platform module says)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    except OSError:
        info = [platform.processor(), platform.platform()]
    return "\n".join([platform.machine(), *info])


def _compiler() -> list[str]:
    """The compiler's command: $CXX where set (it may carry arguments: "ccache g++"), else the
    first of c++, g++ and clang++ found."""
    named = shlex.split(os.environ.get("CXX", ""))
    if named:
        if shutil.which(named[0]) is None:
            raise RuntimeError(f"the C++ compiler {' '.join(named)!r} (CXX) was not found")
        return named
    found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if found is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    return [found]


def _run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)


def _build(source: bytes, cxx: list[str]) -> Path:
    """The compiled library's path, compiling it unless it is cached; raises RuntimeError with the
    compiler's first error line where no set of flags compiles."""
    version = _run([*cxx, "--version"], 60).stdout
    folder = cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    targets = []  # (flags, library) from the fastest flags down
    for extra in _FLAGS[1:]:
        flags = _FLAGS[0] + extra
        key = hashlib.sha256(b"\0".join([source, " ".join(cxx + flags).encode(), version.encode(), _cpu().encode()]))
        targets.append((flags, folder / f"{Path(SOURCE).stem}-{key.hexdigest()[:16]}.so"))
    cached = next((target for _, target in targets if target.is_file()), None)
    if cached is not None:  # where faster flags failed to compile, this spares compiling them again
        return cached
    error = ""
    for flags, target in targets:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
            src, out = Path(scratch) / SOURCE, Path(scratch) / target.name
            src.write_bytes(source)
            done = _run([*cxx, *flags, str(src), "-o", str(out)], 600)
            if done.returncode == 0:
                os.replace(out, target)
                return target
            error = error or next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
    raise RuntimeError(f"{' '.join(cxx)} could not compile {SOURCE}: {error}")


def load(source: bytes) -> ctypes.CDLL:
    """`source` (the kernels' C++) built (or found in the cache) and loaded, its functions'
    signatures declared; raises where it cannot be built or loaded. benchmarks/cpu_kernels_ab.py
    loads two versions of the source side by side this way."""
    lib = ctypes.CDLL(str(_build(source, _compiler())))
    c = ctypes
    lib.int_matmul.restype = lib.sp24_int_matmul.restype = lib.sp24_float_matmul.restype = None
    lib.int_matmul.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_int64, c.c_void_p,
                               c.c_int, c.c_void_p, c.c_int, c.c_int64, c.c_void_p, c.c_int]
    lib.sp24_int_matmul.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_int64, c.c_void_p,
                                    c.c_int64, c.c_void_p, c.c_int, c.c_void_p, c.c_int, c.c_int64, c.c_void_p,
                                    c.c_int]
    lib.sp24_float_matmul.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int, c.c_int64, c.c_int64,
                                      c.c_void_p, c.c_int64, c.c_void_p, c.c_int]
    lib.int_dequantize.restype = lib.sp24_int_dequantize.restype = lib.sp24_float_dense.restype = None
    lib.int_dequantize.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int, c.c_void_p, c.c_int,
                                   c.c_int64, c.c_int64, c.c_void_p, c.c_int]
    lib.sp24_int_dequantize.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p,
                                        c.c_int, c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_void_p, c.c_int]
    lib.sp24_float_dense.argtypes = [c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_int64,
                                     c.c_void_p, c.c_int]
    lib.fp8_matmul.restype = lib.fp8_dequantize.restype = None
    lib.fp8_matmul.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_int64, c.c_void_p,
                               c.c_int, c.c_void_p, c.c_int]
    lib.fp8_dequantize.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int, c.c_int64, c.c_void_p,
                                   c.c_int]
    lib.nf4_matmul.restype = lib.nf4_dequantize.restype = None
    lib.nf4_matmul.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p,
                               c.c_int64, c.c_void_p, c.c_int]
    lib.nf4_dequantize.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_void_p, c.c_int64, c.c_void_p,
                                   c.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None where it cannot be built or loaded."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    try:
        if sys.platform == "win32":
            raise RuntimeError("the C++ CPU kernel is built on Linux and macOS only")
        _library = load(resources.files(__package__).joinpath("csrc", SOURCE).read_bytes())
    except Exception as e:  # no compiler, a failed build or load: the reference serves, as documented
        _failure = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _library


def failure() -> str | None:
    """Why the library could not be built or loaded, once that was tried; None otherwise."""
    return _failure
