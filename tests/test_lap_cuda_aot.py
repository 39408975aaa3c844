"""Ahead-of-time check of the batched LAP kernel (``csrc/lap.cu``), no GPU needed: nvcc compiles it to
an sm_90 cubin with setup.py's flags and ``cuobjdump -res-usage`` / ``-sass`` show no stack, no local
memory (so no register spills) and no calls. Skipped without nvcc or cuobjdump. The cubin is cached
under the temp dir, keyed by the sources and flags (a cold compile is ~5 s on 2 cores)."""
import hashlib
import os
import re
import subprocess
import tempfile

import pytest

from wweight.backends.cuda import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["lap.cu", "lap_elem.h", "common.cuh", "dtype.h"]


@pytest.fixture(scope="module")
def cubin():
    nvcc, tool, pyb = aot.nvcc(), aot.cuobjdump(), aot.pybind11_include()
    if nvcc is None or tool is None or pyb is None:
        pytest.skip(f"needs nvcc, cuobjdump and pybind11 headers (nvcc={nvcc}, cuobjdump={tool}, pybind11={pyb})")
    h = hashlib.sha256(" ".join(aot.NVCC_FLAGS + [nvcc, "sm_90"]).encode())
    for s in SOURCES:
        with open(os.path.join(CSRC, s), "rb") as f:
            h.update(f.read())
    cache = os.path.join(tempfile.gettempdir(), "wweight_lap_aot")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, h.hexdigest()[:20] + ".cubin")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp"
        r = aot.compile_cubin(os.path.join(CSRC, "lap.cu"), tmp, 90, timeout=300)
        assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
        os.replace(tmp, path)
    return tool, path


def test_lap_kernel_compiles_without_spills_stack_or_local_memory(cubin):
    tool, path = cubin
    kernels = {k: (r["reg"], r["stack"], r["shared"], r["local"]) for k, r in aot.res_usage(path, tool).items()}
    names = [k for k in kernels if "lap_sap_kernel" in k]
    assert len(names) == 2, f"expected the shared- and global-memory instantiations, got {list(kernels)}"
    for k in names:
        reg, stack, shared, local = kernels[k]
        assert stack == 0 and local == 0, f"{k}: stack {stack} / local {local} bytes (spills)"
        assert reg <= 128, f"{k}: {reg} registers: 512 threads per block would not fit"
        assert shared < 4096, f"{k}: static shared memory {shared} bytes (the column state is dynamic)"


def test_lap_kernel_sass_has_no_local_memory_or_calls(cubin):
    tool, path = cubin
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    assert len(ops) > 100, "no SASS found"
    bad = sorted({op for op in ops if op.startswith(("LDL", "STL", "CALL"))})
    assert not bad, f"local memory or calls (64-bit division / spills) in the kernel: {bad}"
