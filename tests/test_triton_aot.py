"""Every Triton kernel compiled for sm_90 (and sm_80) without a GPU, its machine code checked.

``wweight/backends/triton/aot.py`` records the launches of real op calls under the interpreter
and compiles each distinct specialisation with Triton's own binder and the bundled ptxas. These
tests assert what the kernels promise on a GPU, which the interpreter cannot show: they compile,
no approximate division or FMA contraction in bit-exact kernels, every integer argument compiles
at 0 / 1 / 16 / 17 / 2**33, no spills, 16-byte loads where inputs are aligned, int64 histograms.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import requires_triton

pytestmark = requires_triton


FAMILIES = ("sparse", "quant", "iso", "interp")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    r = subprocess.run([sys.executable, "-m", "wweight.backends.triton.aot", "--jobs", jobs, "--families", *FAMILIES,
                        "--json", str(out / "aot.json"), "--md", str(out / "aot.md")],
                       env=env, capture_output=True, text=True, cwd=str(out), timeout=1500)
    assert (out / "aot.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "aot.json").read_text())
    print((out / "aot.md").read_text())   # the table (registers, spills, vector widths) in the log
    return res


def _rows(aot, kernel=None, arch=90):
    return [r for r in aot["rows"] if r["arch"] == arch and (kernel is None or r["kernel"] == kernel)]


KERNELS = {"sparse._digit_hist_kernel", "sparse._tie_count_kernel", "sparse._stats_kernel", "sparse._merge_kernel",
           "quant._stats_kernel", "quant._quant_fused_kernel", "quant._pack_kernel", "quant._dequant_kernel",
           "quant._dq_matmul_kernel", "iso._task_vector_kernel",
           "interp._slerp_blend_kernel", "interp._nearswap_kernel", "interp._ram_count_kernel",
           "interp._ram_merge_kernel"}


def test_every_kernel_recorded_and_compiled_for_sm90_and_sm80(aot):
    assert {r["kernel"] for r in _rows(aot)} == KERNELS
    assert {r["kernel"] for r in _rows(aot, arch=80)} == KERNELS
    bad = [(r["kernel"], r["arch"], r["modes"], r["error"]) for r in aot["rows"] if not r["ok"]]
    assert not bad, bad


def test_modes_cover_the_flag_combinations(aot):
    merges = [r["modes"] for r in _rows(aot, "sparse._merge_kernel")]
    for flag in ("MODE=0", "MODE=1", "MODE=2", "HAS_TIES=True", "CONSENSUS=True", "NORMALIZE=True",
                 "APPLY_LAMBDA=True", "HAS_BASE=False", "SPARSIFY_ONLY=True", "unaligned"):
        assert any(flag in m for m in merges), flag
    for dt in ("float32", "bfloat16", "float16"):
        for k in ("sparse._merge_kernel", "quant._quant_fused_kernel", "quant._dequant_kernel",
                  "iso._task_vector_kernel", "interp._slerp_blend_kernel", "interp._nearswap_kernel",
                  "interp._ram_count_kernel", "interp._ram_merge_kernel"):
            assert any(dt in r["modes"] for r in _rows(aot, k)), (k, dt)


def test_no_approximate_division_or_contraction_in_bit_exact_kernels(aot):
    from wweight.backends.triton.aot import NOT_BIT_EXACT

    bad = [(r["kernel"], r["modes"], r["approx"], r["fma"]) for r in aot["rows"]
           if r["ok"] and r["kernel"] not in NOT_BIT_EXACT and (r["approx"] or r["fma"])]
    assert not bad, bad
    assert all(not r["fp_fusion"] for r in aot["rows"] if r["ok"])


def test_every_integer_argument_compiles_for_every_specialisation_class(aot):
    # Triton makes an integer argument equal to 1 a constant and >= 2**31 a 64-bit one: the
    # interpreter does neither (seed=1 once failed to compile: 'int' object has no attribute 'to')
    swept = [r for r in _rows(aot) if "sweep" in r]
    assert {r["kernel"] for r in swept} == KERNELS
    bad = [(r["kernel"], v, err) for r in swept for v, err in r["sweep"].items() if err]
    assert not bad, bad


def test_no_spills_and_registers_reported(aot):
    for r in aot["rows"]:
        if r["ok"]:
            assert 0 < r["regs"] <= 255, r
            assert r["local"] == 0 and r["stack"] == 0 and r["spill_insts"] == 0, (r["kernel"], r["modes"])


def test_sixteen_byte_loads_where_inputs_are_aligned(aot):
    # the element-streaming kernels read their inputs with 16-byte vector loads when the tensors are
    # 16-byte aligned and n is divisible by 16 (the size class of the recorded calls); the merge
    # kernels read through the pointer table, whose alignment the launcher asserts (ALIGNED)
    for k in ("sparse._merge_kernel", "sparse._stats_kernel", "sparse._tie_count_kernel", "sparse._digit_hist_kernel",
              "iso._task_vector_kernel", "quant._quant_fused_kernel", "quant._pack_kernel",
              "interp._slerp_blend_kernel", "interp._nearswap_kernel", "interp._ram_count_kernel",
              "interp._ram_merge_kernel"):
        rows = [r for r in _rows(aot, k) if r["ok"] and "unaligned" not in r["modes"]]
        assert rows, k
        assert max(r["ld_bytes"] for r in rows) == 16, (k, [(r["modes"], r["ld_bytes"]) for r in rows])
    # the dequantize kernel writes 8 codes per group with one 16-byte store (fp16/bf16) or two (fp32)
    assert max(r["st_bytes"] for r in _rows(aot, "quant._dequant_kernel")) == 16


def test_histogram_counts_in_int64(aot):
    # one bin can hold more than 2**31 elements (2**31 + 4096 zeros): the global histogram is int64
    rows = _rows(aot, "sparse._digit_hist_kernel")
    assert rows and all(r["u64_atomics"] > 0 for r in rows)


def test_interp_kernels_cover_ram_and_ramplus_and_stay_contraction_free(aot):
    # RAM and RAM+ share one merge kernel (PLUS); every interp kernel is bit-exact: zero float FMAs
    # (the interpreter rounds each op; only this check shows ptxas was not allowed to fuse)
    modes = [r["modes"] for r in _rows(aot, "interp._ram_merge_kernel")]
    assert any("PLUS=True" in m for m in modes) and any("PLUS=False" in m for m in modes)
    rows = [r for r in aot["rows"] if r["family"] == "interp"]
    assert rows and all(r["ok"] and r["fma"] == 0 and not r["approx"] for r in rows), rows
    assert any("unaligned" in r["modes"] for r in rows)
