"""DELLA / DELLA-linear merges: wweight's fused C++ path vs the reference path vs mergekit 0.1.5.

Same tensors for all three (a (rows, cols) base and K fine-tunes, base + 0.01 N(0, 1)): ``fused`` is
``backend="cpu"`` (csrc/cpu/della_cpu.cpp), ``reference`` is the path every other backend still runs
(wweight/reference/sparse.py, ``fixed_order=True``; what ``cpu`` ran before the fused path), and
``mergekit`` is mergekit's own ``GeneralizedTaskArithmeticMerge.merge_group``. Each is timed and its
peak memory measured in a fresh child process: the extra resident memory of the call over the inputs
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus the resident set before the call).

    python -m benchmarks della                      # 4096 x 4096 (16M elements), K = 4, fp32 + bf16
    python -m benchmarks della --shape 1024,4096 --iters 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .common import write_results

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("fused", "reference", "mergekit")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(impl: str, method: str, dtype: str, rows: int, cols: int, K: int, iters: int) -> dict:
    import time

    import wweight
    from .bench_sparse import mergekit_merge_fn

    dt = DT[dtype]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g).to(dt)
    tensors = [(base.float() + 0.01 * torch.randn(rows, cols, generator=g)).to(dt) for _ in range(K)]
    if impl == "mergekit":
        fn = mergekit_merge_fn(method, base, tensors, 0.4)
        if fn is None:
            return {"error": "mergekit not importable"}
    else:
        be = "cpu" if impl == "fused" else "torch"   # torch: today's reference path (fixed_order=True)

        def fn():
            return wweight.merge_tensors(method, base, tensors, density=0.4, epsilon=0.15, seed=1, backend=be)
    # warm up on a small problem first: the first call imports modules (torch.library, mergekit) whose
    # time and memory are not the merge's
    wb = torch.randn(8, 256, generator=g).to(dt)
    wts = [(wb.float() + 0.01 * torch.randn(8, 256, generator=g)).to(dt) for _ in range(K)]
    if impl == "mergekit":
        mergekit_merge_fn(method, wb, wts, 0.4)()
    else:
        wweight.merge_tensors(method, wb, wts, density=0.4, epsilon=0.15, seed=1, backend=be)
    del wb, wts
    rss0 = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset VmHWM to the current resident set
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    peak = _rss_kb("VmHWM")
    times.sort()
    return {"s": times[len(times) // 2], "peak_extra_MB": (peak - rss0) / 1024,
            "inputs_MB": (K + 1) * rows * cols * dt.itemsize / 2 ** 20}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks della")
    ap.add_argument("--shape", default="4096,4096")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default="della,della_linear")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--iters", type=int, default=3, help="runs of the fused path (the others run once)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, method, dtype, rows, cols, K, iters = args.child
        print(json.dumps(child(impl, method, dtype, int(rows), int(cols), int(K), int(iters))))
        return 0
    rows_n, cols_n = (int(s) for s in args.shape.split(","))
    results = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            row = {"method": method, "dtype": dtype, "shape": f"{rows_n}x{cols_n}", "K": args.K}
            for impl in args.impls.split(","):
                iters = args.iters if impl == "fused" else 1
                cmd = [sys.executable, "-m", "benchmarks.bench_della", "--child", impl, method, dtype, str(rows_n),
                       str(cols_n), str(args.K), str(iters)]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                    os.path.abspath(__file__))))
                if p.returncode:
                    print(p.stderr[-2000:], file=sys.stderr)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                if "error" in r:
                    print(f"{impl}: {r['error']}", file=sys.stderr)
                    continue
                row[f"{impl}_s"] = r["s"]
                row[f"{impl}_peak_MB"] = r["peak_extra_MB"]
                row["inputs_MB"] = r["inputs_MB"]
            for other in ("reference", "mergekit"):
                if f"{other}_s" in row and "fused_s" in row:
                    row[f"x_{other}"] = row[f"{other}_s"] / row["fused_s"]
            print(row, flush=True)
            results.append(row)
    cols = ["method", "dtype", "shape", "K", "inputs_MB"] + [f"{i}_{c}" for c in ("s", "peak_MB") for i in IMPLS] + [
        "x_reference", "x_mergekit"]
    md = write_results("della", torch.device("cpu"), results, columns=cols,
                       extra={"note": "2-core CPU, shared with other jobs (7 helpers share the machine); "
                                      "peak_MB = extra resident memory of the call over the inputs"},
                       title="Fused DELLA merges vs reference vs mergekit")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
