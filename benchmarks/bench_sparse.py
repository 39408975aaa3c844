"""Sparse family benchmark: fused TIES / DARE / Breadcrumbs merges and kth_largest_abs.

For every shape, dtype and K: median time per backend, effective GB/s (bytes of the K+1 inputs
read once and the output written once, over the time), % of the copy bandwidth measured in the
same run on the same device, and the ratio to the plain torch reference and to mergekit 0.1.5's
own code (``GeneralizedTaskArithmeticMerge.merge_group``) on the same device.

    python -m benchmarks sparse --quick            # CPU-sized (a few minutes on 2 cores)
    python -m benchmarks sparse --device cuda      # 1M .. 1G elements, K = 2, 4, 8
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

import wweight
from wweight import _ext
from wweight import methods as M

from .common import bench, copy_bandwidth, device_name, write_results

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mergekit_merge_fn(method, base, tensors, density):
    try:
        from mergekit.merge_methods.base import TensorGroup
        from mergekit.merge_methods.registry import get as mk_get
    except Exception:
        return None
    m = mk_get(method)
    group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    ids = [e.id for e in group.entries if not e.is_base]
    spec = M.get(method)  # the same defaults for both tools: the registry's (= mergekit's)
    params = {"int8_mask": False, "normalize": spec.normalize, "rescale": spec.rescale, "lambda": M.LAMBDA.default,
              "weight": {i: 1.0 for i in ids}, "density": {i: density for i in ids},
              "gamma": {i: M.GAMMA.default for i in ids}, "epsilon": {i: M.EPSILON.default for i in ids}}
    return lambda: m.merge_group(group, **params)


def first_touch_ms(nbytes: int = 64 << 20, reps: int = 8) -> dict:
    """Median ms to allocate and first fill a fresh ``nbytes`` CPU buffer, as torch.empty gives it
    and as wweight's outputs get it (``wweight._ext.empty_like``: transparent huge pages): the page
    faults every freshly allocated output pays once."""
    import statistics

    from wweight._ext import empty_like
    like = torch.empty(nbytes // 4)          # never written: no pages of its own
    out = {}
    for name, alloc in (("first_touch_64MB_4k_pages_ms", lambda: torch.empty_like(like)),
                        ("first_touch_64MB_huge_pages_ms", lambda: empty_like(like))):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            t = alloc()
            t.fill_(1.0)
            ts.append(time.perf_counter() - t0)
            del t
        out[name] = round(1e3 * statistics.median(ts), 1)
    buf = torch.empty_like(like)
    out["fill_64MB_warm_ms"] = round(1e3 * bench(lambda: buf.fill_(1.0), torch.device("cpu"), warmup=1, iters=5), 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks sparse")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--sizes", type=str, default=None, help="comma list of element counts")
    ap.add_argument("--ks", type=str, default=None)
    ap.add_argument("--dtypes", type=str, default=None)
    ap.add_argument("--methods", type=str, default="ties,dare_ties,breadcrumbs_ties")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.quick:
        sizes, ks, dtypes = [1 << 20, 1 << 22, 1 << 24], [2, 4], ["fp32", "bf16"]
    elif dev.type == "cuda":
        sizes, ks, dtypes = [1 << 20, 1 << 24, 1 << 26, 1 << 28, 1 << 30], [2, 4, 8], ["fp32", "bf16", "fp16"]
    else:
        sizes, ks, dtypes = [1 << 20, 1 << 22, 1 << 24, 1 << 26], [2, 4, 8], ["fp32", "bf16"]
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.ks:
        ks = [int(k) for k in args.ks.split(",")]
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    methods = args.methods.split(",")
    for m in methods:  # a name the registry does not know is a usage error, not a crash mid-run
        if m not in M.registered("sparse") or not M.get(m).needs_base:
            ap.error(f"--methods: {m!r} is not a task-arithmetic method (one of {', '.join(M.TA_METHODS)})")
    backends = ["cuda", "triton", "torch"] if dev.type == "cuda" else (["cpu", "torch"] if _ext.cpu_extension() else ["torch"])
    if dev.type == "cuda" and _ext.cuda_extension() is None:
        backends.remove("cuda")

    bw = copy_bandwidth(dev)
    print(f"device: {device_name(dev)}; copy bandwidth {bw:.1f} GB/s; backends {backends}")
    extra = {"copy_bandwidth_GBps": round(bw, 2)}
    if dev.type == "cpu":
        extra.update(first_touch_ms())
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for dname in dtypes:
        dt = DT[dname]
        for n in sizes:
            for K in ks:
                mem_need = (K + 2) * n * dt.itemsize * (3 if dev.type == "cpu" else 1.5)
                if dev.type == "cuda" and mem_need > torch.cuda.get_device_properties(dev).total_memory * 0.8:
                    continue
                base = torch.randn(n, device=dev, dtype=torch.float32).to(dt)
                tensors = [(base.float() + 0.01 * torch.randn(n, device=dev)).to(dt) for _ in range(K)]
                nbytes = (K + 2) * n * dt.itemsize
                for method in methods:
                    row = {"method": method, "dtype": dname, "n": n, "K": K}
                    times = {}
                    for be in backends:
                        fn = lambda: wweight.merge_tensors(method, base, tensors, density=0.2, seed=1, backend=be)
                        times[be] = bench(fn, dev, warmup=1, iters=args.iters)
                    small = n <= (1 << 24) or dev.type == "cuda"
                    if small and n <= (1 << 26):
                        times["reference"] = bench(
                            lambda: wweight.merge_tensors(method, base, tensors, density=0.2, seed=1, backend="reference"),
                            dev, warmup=0, iters=1 if dev.type == "cpu" else 3)
                    if not args.no_mergekit and small and n <= (1 << 26):
                        mk = mergekit_merge_fn(method, base, tensors, 0.2)
                        if mk is not None:
                            times["mergekit"] = bench(mk, dev, warmup=0, iters=1 if dev.type == "cpu" else 3)
                    best_be = min(backends, key=lambda b: times[b])
                    t = times[best_be]
                    row.update({f"{b}_ms": times[b] * 1e3 for b in times})
                    row["best"] = best_be
                    row["GB/s"] = nbytes / t / 1e9
                    row["%copy"] = 100 * nbytes / t / 1e9 / bw
                    if "reference" in times:
                        row["x_reference"] = times["reference"] / t
                    if "mergekit" in times:
                        row["x_mergekit"] = times["mergekit"] / t
                    print(row)
                    rows.append(row)
                # kth_largest_abs of one delta vs torch.kthvalue
                x = tensors[0] - base if K == ks[0] else None
                if x is not None:
                    k = n // 5
                    row = {"method": "kth_largest_abs", "dtype": dname, "n": n, "K": 1}
                    times = {be: bench(lambda: wweight.kth_largest_abs(x, k, backend=be), dev, warmup=1,
                                       iters=args.iters) for be in backends}
                    try:
                        times["torch.kthvalue"] = bench(lambda: torch.kthvalue(x.abs().flatten(), n - k + 1), dev,
                                                        warmup=1, iters=3)
                    except RuntimeError:
                        pass
                    best_be = min(backends, key=lambda b: times[b])
                    row.update({f"{b}_ms": times[b] * 1e3 for b in times})
                    row["best"] = best_be
                    row["GB/s"] = n * dt.itemsize / times[best_be] / 1e9
                    row["%copy"] = 100 * row["GB/s"] / bw
                    if "torch.kthvalue" in times:
                        row["x_kthvalue"] = times["torch.kthvalue"] / times[best_be]
                    print(row)
                    rows.append(row)
                del base, tensors, x
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    cols = ["method", "dtype", "n", "K", "best", "GB/s", "%copy"] + sorted(
        {c for r in rows for c in r if c.endswith("_ms")}) + ["x_reference", "x_mergekit", "x_kthvalue"]
    md = write_results("sparse", dev, rows, extra=extra, columns=cols,
                       title="Sparse merges and kth_largest_abs")
    print(md)
    return 0
