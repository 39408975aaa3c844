"""mergekit's other merge methods (wweight.interp): wweight vs mergekit 0.1.5's own code.

For every method, dtype, size and K: time of ``wweight.merge_tensors`` (default path) and of
mergekit's registered method object on the same tensors (``registry.get(name)([TensorGroup])``,
what its executor runs), timed in turn each round; the minimum (``*_ms``, what the ratio uses: the
VM is shared, so the minimum is the least disturbed run) and the median; effective GB/s (the
inputs read once and the output written once, over the time), % of the copy bandwidth measured
in the same run, and the ratio to mergekit.

    python -m benchmarks methods                 # CPU: 1M, 4M, 16M elements, K = 2, 4
    python -m benchmarks methods --quick         # 1M, 4M; K = 2
    python -m benchmarks methods --threads 1     # what benchmarks/results/methods_cpu.md ran (shared VM)
"""
from __future__ import annotations

import argparse
import gc

import torch

import wweight
from wweight import methods as M

import statistics
import time

from .common import copy_bandwidth, device_name, sync, write_results

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARAMS = {"slerp": {"t": 0.3}, "nearswap": {"t": 1e-3}, "sce": {"select_topk": 0.5},
          "nuslerp": {"weight": 1.0}, "multislerp": {"weight": 1.0}}


def _inputs(m, base, tensors):
    """(wweight base, wweight tensors, mergekit inputs, mergekit base_index)."""
    if not m.needs_base:
        return None, tensors, list(tensors), None
    return base, tensors, [base, *tensors], 0


def interleaved(fns, device, iters):
    """(min, median) seconds of each fn, the fns timed in turn each round (a shared machine's load
    then hits both tools alike); one warm-up call each."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(iters):
        for f, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [(min(ts), statistics.median(ts)) for ts in times]


def mergekit_fn(name, inputs, base_index, params):
    try:
        from mergekit.merge_methods.base import TensorGroup
        from mergekit.merge_methods.registry import get as mk_get
    except Exception:
        return None
    method = mk_get(name)
    group = TensorGroup.from_tensors(inputs, base_index=base_index)
    return lambda: method([group], parameters=params)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks methods")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=str, default=None, help="comma list of element counts")
    ap.add_argument("--ks", type=str, default=None)
    ap.add_argument("--dtypes", type=str, default="fp32,bf16")
    ap.add_argument("--methods", type=str, default=",".join(M.INTERP_METHODS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sizes = [1 << 20, 1 << 22] if args.quick else [1 << 20, 1 << 22, 1 << 24]
    ks = [2] if args.quick else [2, 4]
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.ks:
        ks = [int(k) for k in args.ks.split(",")]
    methods = args.methods.split(",")
    for name in methods:
        if name not in M.INTERP_METHODS:
            ap.error(f"--methods: {name!r} is not one of {', '.join(M.INTERP_METHODS)}")
    bw = copy_bandwidth(dev)
    print(f"device: {device_name(dev)}; copy bandwidth {bw:.1f} GB/s")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for dname in args.dtypes.split(","):
        dt = DT[dname]
        for n in sizes:
            base = torch.randn(n, generator=g).to(dev, dt)
            pool = [(base.float() + 0.01 * torch.randn(n, generator=g).to(dev)).to(dt) for _ in range(max(ks))]
            for name in methods:
                m = M.get(name)
                for K in sorted({min(max(k, m.min_models), m.max_models or k) for k in ks}):
                    b, ts, mk_in, bi = _inputs(m, base, pool[:K])
                    p = dict(PARAMS.get(name, {}))
                    kw = {k: v for k, v in p.items() if k != "weight"}
                    if "weight" in p:
                        kw["weights"] = [1.0] * K
                    fns = [lambda: wweight.merge_tensors(name, b, ts, **kw)]
                    mk = mergekit_fn(name, mk_in, bi, {k: ([v] * K if k == "weight" else v) for k, v in p.items()})
                    if mk is not None:
                        fns.append(mk)
                    res = interleaved(fns, dev, args.iters)
                    t_ww = res[0][0]
                    nbytes = (len(mk_in) + 1) * n * dt.itemsize
                    row = {"method": name, "dtype": dname, "n": n, "K": K, "wweight_ms": t_ww * 1e3,
                           "wweight_median_ms": res[0][1] * 1e3,
                           "GB/s": nbytes / t_ww / 1e9, "%copy": 100 * nbytes / t_ww / 1e9 / bw}
                    if mk is not None:
                        row["mergekit_ms"] = res[1][0] * 1e3
                        row["mergekit_median_ms"] = res[1][1] * 1e3
                        row["x_mergekit"] = res[1][0] / t_ww
                    print(row, flush=True)
                    rows.append(row)
            del base, pool
            gc.collect()
    cols = ["method", "dtype", "n", "K", "wweight_ms", "mergekit_ms", "x_mergekit", "GB/s", "%copy",
            "wweight_median_ms", "mergekit_median_ms"]
    md = write_results("methods", dev, rows, columns=cols, extra={"copy_GBps": bw, "threads": torch.get_num_threads()},
                       title="mergekit's other methods (wweight.interp)")
    print(md)


if __name__ == "__main__":
    main()
