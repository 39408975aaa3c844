"""CPU time of the outlier-selection steps around the quant kernels, before / after issue 11.

    python benchmarks/outlier_passes.py [n]

before: ``x.float().abs() >= thr`` + nonzero, and ``isfinite(x).all()`` up front;
after:  :func:`wweight.quant.outliers.outlier_indices` (the weight's own dtype) and the one
read-only ``aminmax`` pass the Triton path keeps (the CUDA path has none). CPU figures only:
they show the removed work, not GPU bandwidth.
"""
from __future__ import annotations

import sys
import time

import torch

from wweight.quant.outliers import outlier_indices
from wweight.sparse import kth_largest_abs


def _best(fn, reps=5):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t) * 1e3


def main(n: int = 1 << 24):
    g = torch.Generator().manual_seed(0)
    print(f"| dtype | n | outlier idx before (ms) | after (ms) | finite check before (ms) | after (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(n, generator=g).to(dt)
        thr = float(kth_largest_abs(x, max(1, n // 100)))
        old = lambda: torch.nonzero(x.float().abs() >= thr).view(-1)
        new = lambda: outlier_indices(x, thr, None)
        assert torch.equal(old(), new())
        fin_old = lambda: bool(torch.isfinite(x).all())
        fin_new = lambda: [float(v) for v in torch.aminmax(x)]
        print(f"| {str(dt).split('.')[-1]} | {n} | {_best(old):.1f} | {_best(new):.1f} | {_best(fin_old):.1f} "
              f"| {_best(fin_new):.1f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 24)
