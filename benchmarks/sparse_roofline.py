"""Where a fused sparse merge's time goes, pass by pass, against the memory floor (CPU).

``python -m benchmarks sparse-roofline [--n 16777216] [--k 4] [--dtypes fp32,bf16] [--iters 5]``

A fused TIES / DARE-TIES / Breadcrumbs-TIES merge on the C++ backend is three passes over the
inputs (``wweight/sparse/fused.py``): the exact threshold (``plan.build_plan``: the one-pass select,
reading base + K models), DARE's L1-rescale statistics (``rescale_factors``, reading them again)
and the merge (``prims.merge``: reading them a last time and writing the output). Each pass is
timed alone (median of ``--iters``) and compared with the time the memory system needs for its
bytes: the same-run read bandwidth (``torch.sum`` of a 256 MB float32 buffer, 2 threads) for the
bytes it reads, the copy bandwidth for the output it writes. ``pass_%floor`` = floor / measured:
100 % would be a memory-bound pass; far below it the pass is bound by its computation. The issue's
figure, ``%copy`` of the whole merge, counts the inputs once (bytes = inputs + output over the
whole time), so even three passes at the memory floor would stay below 100 %.

The compute side of the roofline: each pass is also timed on ``--cache-n`` elements (default 1M:
base + 4 fp32 models are 20 MB, inside the last-level cache: 480 MB of L3 on the Xeon VM of
2026-12-03, 32 MB per CCD on a Zen 4 EPYC; 128K, inside L2, distorts the threshold pass, whose
sample does not shrink with n) and on half as many, each the best of calls repeated for
``--cache-time`` seconds. The difference over the elements between (the slope, free of the
per-call costs: Python, dispatch, thread wake-up), scaled to ``--n``, is ``*_cache_ms``: the pass
with its data in cache, about the time its instructions take with DRAM out of the way. A pass whose
``*_cache_ms`` is near its ``*_ms`` is bound by its computation: no memory system or access
pattern can make it faster. ``*_cache_%`` = cache / measured.
Results: ``benchmarks/results/sparse_roofline_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import time

import torch

import wweight
from wweight import methods as M
from wweight.sparse import fused
from wweight.sparse.ops import primitives

from .common import bench, copy_bandwidth, write_results

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CPU = torch.device("cpu")


def read_bandwidth(nbytes: int = 256 << 20, iters: int = 10) -> float:
    """GB/s of reading a float32 buffer once (``torch.sum``)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    return nbytes / bench(lambda: x.sum(), _CPU, warmup=1, iters=iters) / 1e9


def passes(method: str, base, tensors, density: float, seed: int, iters: int, timer=None) -> dict:
    """Seconds of each pass of ``method`` as ``fused.task_arithmetic`` runs them, and of the whole op
    (``timer(fn)``: seconds of one call; default the median of ``iters``)."""
    m = M.get(method)
    K = len(tensors)
    prims = primitives("cpu")
    dens, gam = [density] * K, [0.01] * K
    _median_s = timer or (lambda fn, iters: bench(fn, _CPU, warmup=1, iters=iters))
    out = {"plan_s": _median_s(lambda: fused.build_plan(prims, tensors, base, m.sparsification, dens, gam, seed),
                               iters)}
    plan = fused.build_plan(prims, tensors, base, m.sparsification, dens, gam, seed)
    rescale = "l1" if m.rescale else None
    wdt = fused.work_dtype(base.dtype, m.sparsification)
    if rescale:
        out["stats_s"] = _median_s(lambda: fused.rescale_factors(prims, tensors, base, plan, rescale, dens,
                                                                 base.dtype, wdt), iters)
    scales = fused.rescale_factors(prims, tensors, base, plan, rescale, dens, base.dtype, wdt)
    w = torch.ones(K, dtype=torch.float32)
    res = torch.empty_like(base)
    out["merge_s"] = _median_s(lambda: prims.merge(tensors, base, res, plan, w, scales, 1.0, float(K),
                                                   m.consensus is not None, False), iters)
    out["total_s"] = _median_s(lambda: wweight.merge_tensors(method, base, tensors, density=density, seed=seed,
                                                             backend="cpu"), iters)
    return out


def _inputs(n, K, dt, g):
    base = torch.randn(n, generator=g).to(dt)
    return base, [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dt) for _ in range(K)]


def cached_passes(method, n, K, dt, seconds) -> dict:
    """Seconds per element of each pass with its data in cache (see the module doc): the pass on
    ``n`` elements minus the same on ``n / 2`` (best of repeated calls for ``seconds`` each), over the
    ``n / 2`` elements between: the slope, without the per-call costs."""
    g = torch.Generator().manual_seed(1)

    def best(fn, iters):
        fn()
        ts, t_end = [], time.perf_counter() + seconds / 8   # 8 timings per call of passes()
        while time.perf_counter() < t_end or len(ts) < 5:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    small = passes(method, *_inputs(n // 2, K, dt, g), 0.2, 1, 0, timer=best)
    big = passes(method, *_inputs(n, K, dt, g), 0.2, 1, 0, timer=best)
    return {k: max(big[k] - small[k], 0.0) / (n - n // 2) for k in big}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks sparse-roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default="ties,dare_ties,breadcrumbs_ties")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--cache-n", type=int, default=1 << 20, help="elements of the in-cache runs (0: skip them)")
    ap.add_argument("--cache-time", type=float, default=2.0, help="seconds per pass of the in-cache runs")
    args = ap.parse_args(argv)
    if wweight._ext.cpu_extension() is None:
        print("the C++ CPU extension is not built: nothing to measure")
        return 1
    copy_bw = copy_bandwidth(torch.device("cpu"))
    read_bw = read_bandwidth()
    print(f"copy {copy_bw:.1f} GB/s, read {read_bw:.1f} GB/s", flush=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    n, K = args.n, args.k
    for dname in args.dtypes.split(","):
        dt = DT[dname]
        base, tensors = _inputs(n, K, dt, g)
        ins = (K + 1) * n * dt.itemsize     # one pass over base + K models
        outb = n * dt.itemsize
        read_floor = ins / read_bw / 1e9
        for method in args.methods.split(","):
            r = passes(method, base, tensors, 0.2, 1, args.iters)
            row = {"method": method, "dtype": dname, "n": n, "K": K, "total_ms": 1e3 * r["total_s"],
                   "%copy": 100 * (ins + outb) / r["total_s"] / 1e9 / copy_bw}
            floors = {"plan": read_floor, "stats": read_floor, "merge": read_floor + 2 * outb / copy_bw / 1e9}
            # DARE's random masks need no threshold: its plan reads nothing (not a pass over the inputs)
            reads = {"plan": M.get(method).sparsification != "random", "stats": True, "merge": True}
            for p in ("plan", "stats", "merge"):
                if f"{p}_s" in r and reads[p]:
                    row[f"{p}_ms"] = 1e3 * r[f"{p}_s"]
                    row[f"{p}_floor_ms"] = 1e3 * floors[p]
                    row[f"{p}_%floor"] = 100 * floors[p] / r[f"{p}_s"]
            if args.cache_n:
                per = cached_passes(method, args.cache_n, K, dt, args.cache_time)
                for p in ("plan", "stats", "merge"):
                    if f"{p}_ms" in row:
                        row[f"{p}_cache_ms"] = 1e3 * per[f"{p}_s"] * n
                        row[f"{p}_cache_%"] = 100 * row[f"{p}_cache_ms"] / row[f"{p}_ms"]
                row["total_cache_ms"] = 1e3 * per["total_s"] * n
            # what the whole op spends outside its passes: the fresh output's page faults (the passes
            # above write a reused buffer), the per-call Python and dispatch
            row["outside_passes_ms"] = row["total_ms"] - sum(row[f"{p}_ms"] for p in ("plan", "stats", "merge")
                                                             if f"{p}_ms" in row)
            row["passes_floor_ms"] = sum(row[f"{p}_floor_ms"] for p in ("plan", "stats", "merge") if f"{p}_ms" in row)
            row["passes_%copy_at_floor"] = 100 * (ins + outb) / (row["passes_floor_ms"] / 1e3) / 1e9 / copy_bw
            print(row, flush=True)
            rows.append(row)
        del base, tensors
    cols = ["method", "dtype", "n", "K", "total_ms", "%copy", "plan_ms", "plan_floor_ms", "plan_%floor",
            "plan_cache_ms", "plan_cache_%", "stats_ms", "stats_floor_ms", "stats_%floor", "stats_cache_ms",
            "stats_cache_%", "merge_ms", "merge_floor_ms", "merge_%floor", "merge_cache_ms", "merge_cache_%",
            "total_cache_ms", "outside_passes_ms", "passes_floor_ms", "passes_%copy_at_floor"]
    md = write_results("sparse_roofline", torch.device("cpu"), rows, columns=cols,
                       title="Fused sparse merges, pass by pass, vs the memory floor",
                       extra={"copy_bandwidth_GBps": round(copy_bw, 2), "read_bandwidth_GBps": round(read_bw, 2),
                              "note": "plan = the exact threshold (one-pass select), stats = DARE's L1 rescale "
                                      "statistics, merge = the fused mask-and-merge pass; *_floor_ms = the pass's "
                                      "bytes at the same-run read bandwidth (+ the output written at the copy "
                                      "bandwidth for merge); passes_%copy_at_floor = the issue's %copy if every "
                                      "pass ran at its floor; *_cache_ms = the pass with its data in cache "
                                      f"({args.cache_n} elements, minus the per-call cost, scaled to n), "
                                      "*_cache_% = it / the measured pass; outside_passes_ms = total_ms - the "
                                      "passes (the fresh output's page faults: the passes write a reused "
                                      "buffer; per-call Python and dispatch)"})
    print(md)
    return 0
