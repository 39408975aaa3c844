"""Ahead-of-time checks of the CUDA sources without a GPU: compile ``csrc/*.cu`` to a cubin with
setup.py's flags and read its resource usage with ``cuobjdump``.

Used by the compile-check tests (``tests/test_lap_cuda_aot.py``, ``tests/test_lap_auction_aot.py``),
``benchmarks/sass_quant.py`` and the Triton AOT check (its cuobjdump). Nothing here needs a driver.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from typing import Dict, Optional, Sequence

# setup.py's nvcc flags for the extension (``_compile_cuda``) minus the -gencode list: one arch per compile
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "--fmad=false", "-DNDEBUG",
              "-lineinfo"]


def nvcc() -> Optional[str]:
    return os.environ.get("NVCC") or shutil.which("nvcc")


def cuobjdump() -> Optional[str]:
    """$CUOBJDUMP, the PATH's, or the copy Triton's wheel bundles next to its ptxas; None if none exists."""
    cand = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if cand:
        return cand
    try:
        from triton import knobs
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    return path if os.path.exists(path) else None


def pybind11_include() -> Optional[str]:
    """pybind11's headers (the package, else the copy torch ships), or None."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        import torch

        inc = os.path.join(os.path.dirname(torch.__file__), "include")
        return inc if os.path.exists(os.path.join(inc, "pybind11", "pybind11.h")) else None


def compile_cubin(source: str, out: str, arch: int = 90, extra: Sequence[str] = (),
                  timeout: int = 600) -> subprocess.CompletedProcess:
    """``nvcc -cubin`` of ``source`` (a ``csrc/*.cu`` path) for ``sm_<arch>`` with setup.py's flags and
    include dirs (``csrc/``, Python's, pybind11's); ``extra`` flags are appended (e.g. ``-Xptxas -v``)."""
    cmd = [nvcc()] + NVCC_FLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", *extra,
                                   f"-I{pybind11_include()}", f"-I{sysconfig.get_paths()['include']}",
                                   f"-I{os.path.dirname(os.path.abspath(source))}", source, "-o", out]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def res_usage(path: str, tool: Optional[str] = None, arch: Optional[str] = None) -> Dict[str, dict]:
    """``cuobjdump -res-usage`` of a cubin / shared object: kernel (mangled) -> {reg, stack, shared, local}."""
    cmd = [tool or cuobjdump()] + (["-arch", arch] if arch else []) + ["-res-usage", path]
    txt = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    out: Dict[str, dict] = {}
    cur = None
    for line in txt.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and cur:
            out[cur] = dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))
    return out
