"""Bit-identity record of the CPU sparse kernels: ``python -m benchmarks sparse-bits [--write]``.

Runs the sparse family's CPU backend over a fixed grid of cases (fp32 / bf16 / fp16; 1 to 300,001
elements; K = 1, 2, 3, 5; plain, tie-heavy and all-zero deltas; every fused merge method, density
0.2 and 0.9, with and without rescale / normalize / lambda; ``sparsify`` by magnitude, random and
magnitude_outliers under every rescale norm; ``kth_largest_abs``) and hashes the output bits, one
SHA-256 per (dtype, op) group. ``--write`` records them in ``benchmarks/results/sparse_cpu_bits.json``;
without it the run is compared with that record and every group that differs is printed.

Not a test: the rescale statistics sum per-thread partials in thread order, so the record holds for
the thread count (and torch version, which draws the inputs) it was made with; the file says which.
The committed record was made with the kernels before the tiled/AVX2 rewrite (issue 15), so a clean
compare shows that the rewrite changed no bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

import wweight

RECORD = os.path.join(os.path.dirname(__file__), "results", "sparse_cpu_bits.json")
METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic", "linear")


def _data(g, n, dt, K, kind):
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(K)]
    if kind == "ties":
        xs = [base + torch.round(100 * (x - base)) / 100 for x in xs]
    if kind == "zeros":
        xs[0] = base.clone()
    return base.to(dt), [x.to(dt) for x in xs]


def digests() -> dict:
    groups = {}

    def add(group, t):
        h = groups.setdefault(group, hashlib.sha256())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        dn = str(dt).replace("torch.", "")
        for n in (1, 7, 1000, 4099, 70001, 300000):
            for K in (1, 2, 3, 5):
                for kind in ("plain", "ties", "zeros"):
                    base, xs = _data(g, n, dt, K, kind)
                    w = [1.0, -0.5, 0.75, 2.0, 0.3][:K]
                    for m in METHODS:
                        for dens in (0.2, 0.9):
                            kw = {} if m == "linear" else dict(density=dens, seed=3)
                            if m.startswith("breadcrumbs"):
                                kw["gamma"] = 0.05
                            b = None if m == "linear" else base
                            add(f"{dn}/{m}", wweight.merge_tensors(m, b, xs, weights=w, backend="cpu", **kw))
                            if m in ("dare_ties", "ties") and dens == 0.2:
                                add(f"{dn}/{m}/no-rescale-lambda", wweight.merge_tensors(
                                    m, base, xs, weights=w, backend="cpu", rescale=False, normalize=False,
                                    lambda_=0.7, **kw))
                    x = xs[0] - base
                    for meth in ("magnitude", "random", "magnitude_outliers"):
                        kw = {"gamma": 0.01} if meth == "magnitude_outliers" else {}
                        for rn in (None, "l1", "l2", "linf"):
                            add(f"{dn}/sparsify/{meth}/{rn}",
                                wweight.sparsify(x, 0.3, meth, rescale_norm=rn, seed=5, backend="cpu", **kw))
                    if K == 1 and n > 1:
                        add(f"{dn}/kth_largest_abs", wweight.kth_largest_abs(x, max(1, n // 3), backend="cpu"))
    return {k: h.hexdigest() for k, h in sorted(groups.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks sparse-bits")
    ap.add_argument("--write", action="store_true", help="record this build's bits (else: compare with the record)")
    ap.add_argument("--isa", default="auto", help="which build of the C++ kernels runs: auto, baseline, avx2, avx512")
    args = ap.parse_args(argv)
    from wweight._ext import cpu_extension
    ext = cpu_extension()
    if ext is not None and hasattr(ext, "sparse_use_isa"):
        ext.sparse_use_isa(args.isa)
        print(f"kernels: {ext.sparse_isa()}")
    got = digests()
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.write:
        with open(RECORD, "w") as f:
            json.dump({"made_with": meta, "digests": got}, f, indent=1, sort_keys=True)
        print(f"wrote {len(got)} group digests to {RECORD}")
        return 0
    with open(RECORD) as f:
        rec = json.load(f)
    if rec["made_with"] != meta:
        print(f"note: the record was made with {rec['made_with']}, this run is {meta}")
    bad = [k for k in rec["digests"] if got.get(k) != rec["digests"][k]]
    for k in bad:
        print("DIFFERS:", k)
    print(f"{len(rec['digests']) - len(bad)} of {len(rec['digests'])} groups bit-identical to the record")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
