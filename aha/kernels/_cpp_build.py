"""Build and load the C++ CPU kernel (``csrc/aha_cpu.cpp``) with the machine's C++ compiler.

The kernel is compiled once per (source, torch version, compiler, CPU, target) with
``-O3 -march=native -fopenmp`` and cached as a shared library under ``~/.cache/aha/``
(``AHA_CACHE_DIR`` overrides the folder); later processes only load it. ``AHA_CPU_ARCH`` sets
another ``-march`` target: ``x86-64-v3`` for a build that runs on every AVX2 CPU, or an older
CPU's name (``icelake-server``: AVX-512 without AVX512-BF16) to run that CPU's code paths here
(a target above this CPU builds, then dies of an illegal instruction on its first call). ``make install`` builds
it ahead of time (:func:`build_report`); otherwise the first call that needs it
compiles it (about 15 s). ``AHA_DISABLE_CPP=1`` turns it off. When it cannot be built, the
pure-PyTorch implementations are used and :func:`cpp_kernel_error` says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from aha._cache import atomic_file, cache_dir

SOURCE = Path(__file__).parent / "csrc" / "aha_cpu.cpp"

_log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded = False
_error: str | None = None



def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build_arch() -> str:
    """The ``-march`` target of the kernel this process loads: ``AHA_CPU_ARCH``, else ``native``."""
    arch = os.environ.get("AHA_CPU_ARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", arch):
        raise RuntimeError(f"AHA_CPU_ARCH={arch!r} is not a -march name; use e.g. native, x86-64-v3 or icelake-server")
    return arch


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile_command(
    compiler: str, output: Path, arch: str = "native", namespace: str = "aha", optimization: str = "-O3"
) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [arg for path in cpp_extension.include_paths() for arg in ("-isystem", path)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler, optimization, f"-march={arch}", "-fopenmp", "-std=c++20", "-fPIC", "-shared",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DAHA_OPS_NAMESPACE={namespace}", *includes, str(SOURCE), "-o", str(output),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}",
    ]  # fmt: skip


def _compile(compiler: str, output: Path, arch: str = "native", namespace: str = "aha") -> None:
    result = subprocess.run(_compile_command(compiler, output, arch, namespace), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE.name} (-march={arch}) failed:\n{result.stderr[-4000:]}")


def build_variant(target: Path, arch: str, namespace: str) -> None:
    """Compile the kernel for another instruction set (``-march=arch``, e.g. ``x86-64-v3`` = AVX2)
    with its ops under ``torch.ops.<namespace>``, so it can be loaded beside the native build."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found; install g++ or set CXX")
    with atomic_file(target) as partial:
        _compile(compiler, partial, arch, namespace)


def library_path(compiler: str) -> Path:
    """Where the kernel built from the current source for this torch, compiler, CPU and
    :func:`build_arch` is cached."""
    arch = build_arch()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), compiler.encode(), _cpu_signature().encode()):
        key.update(part)
    if arch != "native":  # the native build keeps the name it always had
        key.update(arch.encode())
    return cache_dir() / f"aha_cpu_{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    _log.warning("aha: compiling the C++ CPU attention kernel once (about 15 s) into %s", target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name and rename: concurrent builders never load a half-written file
    with atomic_file(target) as partial:
        _compile(compiler, partial, build_arch())


def load_cpp_kernel() -> bool:
    """Build (if needed) and load the kernel into ``torch.ops.aha``; False when unavailable."""
    global _loaded, _error
    with _lock:
        if _loaded or _error is not None:
            return _loaded
        if os.environ.get("AHA_DISABLE_CPP") == "1":
            _error = "disabled by AHA_DISABLE_CPP=1"
            return False
        if sys.platform != "linux":
            _error = f"the C++ kernel is built on Linux only (this is {sys.platform})"
            return False
        compiler = _compiler()
        if compiler is None:
            _error = "no C++ compiler found; install g++ (Debian: apt-get install g++) or set CXX"
            return False
        try:
            target = library_path(compiler)
            if not target.exists():
                _build(compiler, target)
            try:
                torch.ops.load_library(str(target))
            except OSError as exc:  # a damaged cached build (truncated, overwritten): build it again, once
                _log.warning("aha: the cached C++ kernel %s does not load (%s); rebuilding it", target, exc)
                target.unlink(missing_ok=True)
                _build(compiler, target)
                torch.ops.load_library(str(target))
            from aha.kernels.ops import register_kernel_ops

            register_kernel_ops("aha")
            _loaded = True
        except (OSError, RuntimeError) as exc:
            _error = f"{exc}\nInstall g++ >= 10 or set CXX; the pure-PyTorch paths are used meanwhile."
        return _loaded


def cpp_kernel_error() -> str | None:
    """Why the C++ kernel is unavailable (None when it loaded or was not tried yet)."""
    return _error


def build_report() -> None:
    """Build the kernel now and say where it is or why it is unavailable (``make install`` calls this)."""
    if load_cpp_kernel():
        print(f"aha: C++ CPU kernel ready ({library_path(_compiler() or '')})")
    else:
        print(f"aha: C++ CPU kernel unavailable, using the PyTorch paths: {cpp_kernel_error()}", file=sys.stderr)
