"""csrc/lap_auction.cu compiled ahead of time for sm_90 and sm_80 with setup.py's flags, without a GPU.

What the cooperative kernel promises on a GPU and CPU tests cannot show: it compiles (grid.sync()
without -rdc, CUDA 11+), no register spills or stack frame (a spill in the bid loop would cost a local
memory round trip per column), registers within the launch bound (2 blocks of 256 threads per SM, so
the occupancy API never reports 0 co-resident blocks), and no fused multiply-add in the SASS
(--fmad=false: the rounds must round every product and sum as the CPU model does).
"""
import os
import re
import subprocess

import pytest

from wweight.backends.cuda import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(aot.nvcc() is None, reason="nvcc not on the PATH")


@pytest.fixture(scope="module", params=[90, 80])
def cubin(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp(f"lap_sm{arch}") / "lap_auction.cubin"
    r = aot.compile_cubin(os.path.join(ROOT, "csrc", "lap_auction.cu"), str(out), arch, extra=["-Xptxas", "-v"])
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
    tool = aot.cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled one)")
    usage = aot.res_usage(str(out), tool)
    assert usage, "cuobjdump -res-usage listed no kernel"
    for k, r in usage.items():
        assert r["stack"] == 0 and r["local"] == 0, (k, r)
    sass = subprocess.run([tool, "-sass", str(out)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    assert "lap_auction_kernel" in sass.stdout
    # (HFMA2.MMA -RZ, RZ, imm is how the compiler loads constants, not arithmetic)
    assert not re.search(r"\b(DFMA|FFMA)\b", sass.stdout), "fused multiply-add in the SASS (--fmad=false lost)"
