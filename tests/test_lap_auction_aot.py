"""csrc/lap_auction.cu compiled ahead of time for sm_90 and sm_80 with setup.py's flags, without a GPU.

What the cooperative kernel promises on a GPU and CPU tests cannot show: it compiles (grid.sync()
without -rdc, CUDA 11+), no register spills or stack frame (a spill in the bid loop would cost a local
memory round trip per column), registers within the launch bound (2 blocks of 256 threads per SM, so
the occupancy API never reports 0 co-resident blocks), and no fused multiply-add in the SASS
(--fmad=false: the rounds must round every product and sum as the CPU model does).
"""
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on the PATH")


def _pybind11_include():
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:                     # torch ships the headers too
        import torch

        return os.path.join(os.path.dirname(torch.__file__), "include")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
    except Exception:
        return None
    return cand if os.path.exists(cand) else None


@pytest.fixture(scope="module", params=[90, 80])
def cubin(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp(f"lap_sm{arch}") / "lap_auction.cubin"
    # setup.py's cflags (_compile_cuda), one arch, -cubin instead of -c
    cmd = [NVCC, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "--fmad=false", "-DNDEBUG",
           "-lineinfo", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", f"-I{_pybind11_include()}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(ROOT, 'csrc')}",
           os.path.join(ROOT, "csrc", "lap_auction.cu"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return arch, out, r.stderr


def test_compiles_without_spills(cubin):
    arch, out, log = cubin
    assert out.exists()
    kernel = [ln for ln in log.splitlines() if "lap_auction_kernel" in ln or "spill" in ln or "Used" in ln]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), "\n".join(kernel)
    frames = re.findall(r"(\d+) bytes stack frame", log)
    assert frames and all(f == "0" for f in frames), "\n".join(kernel)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    assert regs and max(regs) <= 128, regs               # __launch_bounds__(256, 2): 65536 / 512


def test_resource_usage_and_no_fma(cubin):
    arch, out, _ = cubin
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled one)")
    res = subprocess.run([tool, "-res-usage", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    line = [ln for ln in res.stdout.splitlines() if "REG:" in ln]
    assert line, res.stdout
    assert "STACK:0" in line[0] and "LOCAL:0" in line[0], line[0]
    sass = subprocess.run([tool, "-sass", str(out)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    assert "lap_auction_kernel" in sass.stdout
    # (HFMA2.MMA -RZ, RZ, imm is how the compiler loads constants, not arithmetic)
    assert not re.search(r"\b(DFMA|FFMA)\b", sass.stdout), "fused multiply-add in the SASS (--fmad=false lost)"
