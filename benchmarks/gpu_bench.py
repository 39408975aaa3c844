"""Smoke benchmark of ``gpu-check``: each op's GB/s and % of the device copy bandwidth measured in the
same run (``torch.empty_like(x).copy_(x)`` of 1 GiB timed with CUDA events), and the host syncs of one
call (torch's sync debug mode: the syncs torch can see, e.g. ``.item()``, ``nonzero``, device->host copies).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .gpu_cases import BENCH_N, BENCH_OPS, DT, gbps, op_bytes, pct_of_copy


def time_events(fn: Callable[[], object], iters: int = 5, warmup: int = 1) -> float:
    """Mean seconds per call between two CUDA events around ``iters`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth_events(dev, nbytes: int = 1 << 30) -> float:
    """GB/s (read + write) of ``torch.empty_like(x).copy_(x)`` on ``dev``."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    with torch.cuda.device(dev):
        t = time_events(lambda: torch.empty_like(x).copy_(x), iters=10, warmup=3)
    return gbps(2 * nbytes, t)


def count_syncs(fn: Callable[[], object]) -> int:
    """Synchronising calls torch reports (``set_sync_debug_mode("warn")``) during one ``fn()``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(x.message).lower() for x in w)


def _ops(dev, dt, backend):
    import wweight

    n, K = BENCH_N, 4
    g = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(n, device=dev, generator=g).to(dt)
    ts = [(base.float() + 0.01 * torch.randn(n, device=dev, generator=g)).to(dt) for _ in range(K)]
    x = ts[0] - base
    ops = {m: (lambda m=m: wweight.merge_tensors(m, base, ts, density=0.2, seed=1, backend=backend))
           for m in ("ties", "dare_ties", "breadcrumbs_ties")}
    ops["kth_largest_abs"] = lambda: wweight.kth_largest_abs(x, n // 5, backend=backend)
    ops["sparsify"] = lambda: wweight.sparsify(x, 0.2, backend=backend)
    ops["quantize"] = lambda: wweight.quantize(base, 4, 64, backend=backend)
    q = wweight.quantize(base, 4, 64, backend=backend)
    ops["dequantize"] = lambda: wweight.dequantize(q, backend=backend)
    if backend == "triton":
        w2 = base[: 8192 * 8192].reshape(8192, 8192)
        qm = wweight.quantize(w2, 4, 64, backend=backend)
        xm = torch.randn(16, 8192, device=dev, dtype=dt)
        ops["dequant_matmul"] = lambda: wweight.dequant_matmul(xm, qm, backend=backend)
    return ops


def run_bench(rec, dev) -> None:
    torch.cuda.set_device(dev)
    bw = copy_bandwidth_events(dev)
    rec.note(f"copy bandwidth {bw:.1f} GB/s (torch.empty_like(x).copy_(x), 1 GiB, CUDA events)")
    rec.row({"op": "copy", "dtype": "fp32", "n": (1 << 30) // 4, "backend": "torch", "GB/s": round(bw, 1),
             "%copy": 100.0})
    for dn in ("bf16", "fp32"):
        for be in ("cuda", "triton"):
            try:
                ops = _ops(dev, DT[dn], be)
            except Exception as e:
                rec.check(f"bench setup {dn}", be, lambda: (False, f"raised {type(e).__name__}: {e}"))
                continue
            for name in BENCH_OPS:
                if name not in ops:
                    continue
                n = 8192 * 8192 if name == "dequant_matmul" else BENCH_N
                box = {}

                def one():
                    t = time_events(ops[name])
                    box["row"] = {"op": name, "dtype": dn, "n": n, "backend": be, "ms": round(t * 1e3, 3),
                                  "GB/s": round(gbps(op_bytes(name, n, DT[dn].itemsize), t), 1),
                                  "%copy": round(pct_of_copy(gbps(op_bytes(name, n, DT[dn].itemsize), t), bw), 1),
                                  "host_syncs": count_syncs(ops[name])}
                    return True, f"{box['row']['GB/s']} GB/s"
                if rec.check(f"bench {name} {dn}", be, one):
                    rec.row(box["row"])
            del ops
            torch.cuda.empty_cache()
