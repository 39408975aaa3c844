"""The checks of ``python -m benchmarks gpu-check``, one child process per step.

``python -m benchmarks.gpu_cases STEP --jsonl PATH [--device cuda:0]`` appends one JSON line per check
(``{"check", "backend", "ok", "detail", "s"}``), note (``{"note"}``) or benchmark row (``{"row"}``) to
PATH as it goes, so a step killed by its time box still leaves what it did. Exit 1 on any failed check.
Every kernel is forced (``backend="cuda"`` / ``"triton"``) and compared with ``wweight.reference``
on CPU copies of the inputs; the case tables below are also what ``gpu-check`` prints as its plan.
The pure helpers (comparison, tolerances, GB/s) are unit-tested in tests/test_gpu_check.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Callable, Optional, Tuple

import torch

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# odd sizes (no multiple of any block or vector width), 2-D / 3-D shapes, and the empty tensors
SHAPES = [(1,), (7,), (1023,), (4097,), (262147,), (37, 29), (3, 4, 5)]
EMPTY = [(0,), (0, 3)]
MERGES = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
          "della", "della_linear"]
SPARSIFY = [("magnitude", None), ("magnitude_outliers", None), ("random", None), ("magnitude", "l1"),
            ("random", "density")]
# bits, block size, symmetric, outliers (as in tests/test_quant.py)
QUANT = [(4, 64, False, None), (3, 64, False, 0.01), (2, 100, True, 0.02), (5, "row", False, {"zscore": 3.0}),
         (6, "tensor", True, None), (7, 37, False, 0.005), (8, 1000, False, None)]
QUANT_SHAPES = [(24, 61), (257, 1031)]
ISO = ["iso_c", "iso_cts", "tsv_m"]
ISO_SHAPES = [(24, 40), (65, 129)]
BIG_N = 2 ** 31 + 4097                    # bf16 elements of the > 2**31 check (4.3 GB per tensor)
BIG_IDX = [5, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 7, BIG_N - 1]
BENCH_N = 1 << 26
BENCH_OPS = ["ties", "dare_ties", "breadcrumbs_ties", "kth_largest_abs", "sparsify", "quantize", "dequantize",
             "dequant_matmul"]
FAMILIES_BY_BACKEND = {
    "cuda": "self-tests (SELFTESTS of backends/cuda/*) + auto dispatch in strict mode; sparse: kth_largest_abs, "
            "sparsify, merge_tensors; quant: quantize, dequantize",
    "triton": "sparse: kth_largest_abs, sparsify, merge_tensors; quant: quantize, dequantize, dequant_matmul; "
              "iso: iso_c/iso_cts/tsv_m (fused task-vector kernel); permute: linear_sum_assignment "
              "(torch GPU auction, no CUDA/Triton kernel) vs scipy",
}


# ----------------------------------------------------------------------------------------- pure helpers
def merge_tolerance(method: str, dtype: torch.dtype, rescale: Optional[bool] = None) -> Optional[Tuple[float, float]]:
    """None = bit-exact against the reference; else (rtol, atol relative to max |want|) (tests/test_sparse.py)."""
    if method == "linear":
        return (1e-6, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    rescaled = rescale if rescale is not None else ("dare" in method or "della" in method)
    if rescaled and dtype == torch.float32:
        return (1e-6, 1e-6)
    return None


def compare(got: torch.Tensor, want: torch.Tensor, tol: Optional[Tuple[float, float]] = None) -> Tuple[bool, str]:
    """(ok, detail): shape, dtype, then bit-exact (``tol`` None) or within rtol/atol (atol scaled by max |want|)."""
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        return False, f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.numel() == 0:
        return True, "empty"
    if not got.is_floating_point():
        bad = int((got != want).sum())
        return bad == 0, f"{bad} of {got.numel()} differ"
    g, w = got.double(), want.double()
    err = (g - w).abs()
    same_nan = torch.isnan(g) == torch.isnan(w)
    err = torch.where(torch.isnan(g) & torch.isnan(w), torch.zeros_like(err), err)
    if tol is None:
        bad = int(((got != want) & ~(torch.isnan(g) & torch.isnan(w))).sum() + (~same_nan).sum())
        return bad == 0, f"{bad} of {got.numel()} differ, max abs err {float(err.nan_to_num(float('inf')).max()):.3g}"
    rtol, atol = tol
    limit = atol * max(1.0, float(w.abs().nan_to_num(0).max())) + rtol * w.abs()
    bad = int((err > limit).sum() + (~same_nan).sum())
    return bad == 0, f"{bad} of {got.numel()} outside rtol {rtol:g}, max abs err {float(err.max()):.3g}"


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def pct_of_copy(op_gbps: float, copy_gbps: float) -> float:
    """Percent of the measured copy bandwidth (both in GB/s of bytes moved: read + write)."""
    return 100.0 * op_gbps / copy_gbps if copy_gbps > 0 else float("nan")


def op_bytes(op: str, n: int, itemsize: int, K: int = 4, bits: int = 4, block: int = 64) -> int:
    """Bytes an op must move at least: inputs read once, output written once."""
    codes = (n * bits + 7) // 8
    scales = 2 * 2 * -(-n // block)          # fp16 scale + zero per block
    if op in ("kth_largest_abs",):
        return n * itemsize
    if op == "sparsify":
        return 2 * n * itemsize
    if op in ("quantize", "dequantize", "dequant_matmul"):
        return codes + scales + (n * itemsize if op != "dequant_matmul" else 0)
    return (K + 2) * n * itemsize              # merges: base + K models read, one output written


# ------------------------------------------------------------------------------------------ recording
class Recorder:
    def __init__(self, path: str):
        self.path, self.failed = path, 0

    def _put(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    def note(self, text: str) -> None:
        print("note:", text, flush=True)
        self._put({"note": text})

    def row(self, row: dict) -> None:
        print(row, flush=True)
        self._put({"row": row})

    def check(self, name: str, backend: str, fn: Callable[[], Tuple[bool, str]]) -> bool:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # a raise is a failure of that check, not of the step
            ok, detail = False, f"raised {type(e).__name__}: {e}"[:500]
            if self.failed < 5:  # the first tracebacks only: the log stays small when everything fails
                traceback.print_exc()
        self.failed += not ok
        rec = {"check": name, "backend": backend, "ok": bool(ok), "detail": detail, "s": round(time.perf_counter() - t0, 3)}
        if not ok:
            print("FAIL", rec, flush=True)
        self._put(rec)
        return ok


# ------------------------------------------------------------------------------------ the checks
def _case(shape, dtype, K, seed):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n, generator=g).reshape(shape).to(dtype)
    ts = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(K)]
    if n > 8:
        for t in ts[:1]:   # plant ties and exact zeros in the first delta
            f = t.reshape(-1)
            f[::7] = f[1]
            f[2::11] = base.reshape(-1)[2::11]
    return base, ts


def cached(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn()`` computed on first call (inside a check, so a raising reference fails that check only)."""
    box = []
    return lambda: box[0] if box else (box.append(fn()) or box[0])


def to_view(t: torch.Tensor, dev, kind: str) -> torch.Tensor:
    """``t`` on ``dev`` as a contiguous tensor, a view at a storage offset of 3 elements, or a transposed view."""
    if kind == "offset":
        buf = torch.empty(t.numel() + 3, dtype=t.dtype, device=dev)
        v = buf[3:].view(t.shape)
        v.copy_(t)
        return v
    if kind == "transposed":
        return t.t().contiguous().to(dev).t() if t.dim() == 2 else t.to(dev)
    return t.to(dev)


def check_sparse(rec: Recorder, be: str, dev, shapes=SHAPES, dtypes=tuple(DT), views=("contig", "offset", "transposed")):
    import wweight
    from wweight.reference import sparse as ref

    for dn in dtypes:
        dt = DT[dn]
        for i, shape in enumerate(shapes):
            base, ts = _case(shape, dt, 3, i)
            n = base.numel()
            x = ts[0] - base
            for k in sorted({1, n // 3 + 1, n}):
                rec.check(f"kth_largest_abs {dn} {shape} k={k}", be, lambda: compare(
                    wweight.kth_largest_abs(x.to(dev), k, backend=be), ref.kth_largest_abs_ref(x, k)))
            for method, norm in SPARSIFY:
                tol = (1e-6, 1e-6) if norm == "l1" and dt == torch.float32 else None
                rec.check(f"sparsify {method} norm={norm} {dn} {shape}", be, lambda: compare(
                    wweight.sparsify(x.to(dev), 0.3, method, rescale_norm=norm, seed=i, backend=be),
                    ref.sparsify_ref(x, 0.3, method, rescale_norm=norm, seed=i), tol))
            for method in MERGES:
                kw = dict(weights=[1.0, 0.5, -0.4], seed=i) if method == "linear" else dict(
                    weights=[1.0, 0.5, -0.4], density=[0.3, 0.5, 0.8], seed=i, epsilon=0.1)
                want = cached(lambda: wweight.merge_tensors(method, base, ts, backend="reference", **kw))
                for view in [v for v in views if v != "transposed" or len(shape) == 2]:
                    rec.check(f"merge {method} {dn} {shape} {view}", be, lambda: compare(
                        wweight.merge_tensors(method, to_view(base, dev, view), [to_view(t, dev, view) for t in ts],
                                              backend=be, **kw), want(), merge_tolerance(method, dt)))
        for shape in EMPTY:
            e = torch.empty(shape, dtype=dt)
            rec.check(f"empty merge ties {dn} {shape}", be, lambda: compare(
                wweight.merge_tensors("ties", e.to(dev), [e.to(dev), e.to(dev)], density=0.5, backend=be), e))
            rec.check(f"empty sparsify {dn} {shape}", be, lambda: compare(
                wweight.sparsify(e.to(dev), 0.5, backend=be), e))


def _quant_same(q, r) -> Tuple[bool, str]:
    for f in ("codes", "scale", "zero", "outlier_idx", "outlier_val"):
        a, b = getattr(q, f), getattr(r, f)
        if (a is None) != (b is None):
            return False, f"{f}: one is None"
        if a is not None:
            ok, d = compare(a.long() if f == "outlier_idx" else a, b.long() if f == "outlier_idx" else b)
            if not ok:
                return False, f"{f}: {d}"
    return True, "codes/scale/zero/outliers identical"


def check_quant(rec: Recorder, be: str, dev, shapes=QUANT_SHAPES, dtypes=tuple(DT), matmul=False):
    import wweight

    for dn in dtypes:
        for si, shape in enumerate(shapes):
            w = torch.randn(shape, generator=torch.Generator().manual_seed(si)).to(DT[dn])
            w.reshape(-1)[3] = 20.0
            for bits, bs, sym, out in QUANT:
                r = cached(lambda: wweight.quantize(w, bits, bs, symmetric=sym, outliers=out, backend="reference"))
                rd = cached(lambda: wweight.dequantize(r(), backend="reference"))
                name = f"quant {bits}b block={bs} sym={sym} outliers={out} {dn} {shape}"
                for view in ("contig", "offset"):
                    q = {}

                    def run_q():
                        q["q"] = wweight.quantize(to_view(w, dev, view), bits, bs, symmetric=sym, outliers=out, backend=be)
                        return _quant_same(q["q"], r())
                    if rec.check(f"quantize {name} {view}", be, run_q):
                        rec.check(f"dequantize {name} {view}", be, lambda: compare(
                            wweight.dequantize(q["q"], backend=be), rd()))
                if matmul:
                    x = torch.randn(3, shape[-1], generator=torch.Generator().manual_seed(9)).to(DT[dn])
                    tol = (1e-4, 1e-4) if dn == "fp32" else (3e-2, 3e-2)
                    rec.check("dequant_matmul " + name, be, lambda: compare(
                        wweight.dequant_matmul(x.to(dev), r().to(dev), backend=be),
                        (x.float() @ rd().float().t()).to(DT[dn]), tol))


def check_iso_permute(rec: Recorder, dev, shapes=ISO_SHAPES, dtypes=("fp32", "bf16")):
    import numpy as np
    import wweight
    from scipy.optimize import linear_sum_assignment as sp_lsa

    for dn in dtypes:
        for si, shape in enumerate(shapes):
            base, ts = _case(shape, DT[dn], 3, 20 + si)
            for m in ISO:
                want = cached(lambda: wweight.merge_tensors(m, base, ts, backend="reference"))
                bd, tsd = base.to(dev), [t.to(dev) for t in ts]
                rec.check(f"{m} {dn} {shape} vs torch", "triton", lambda: compare(
                    wweight.merge_tensors(m, bd, tsd, backend="triton"), wweight.merge_tensors(m, bd, tsd, backend="torch")))
                rec.check(f"{m} {dn} {shape} vs reference", "triton", lambda: compare(
                    wweight.merge_tensors(m, bd, tsd, backend="triton"), want(), (1e-3, 1e-3) if dn == "fp32" else (2e-2, 2e-2)))
    g = torch.Generator().manual_seed(5)
    for shape in [(8, 64, 64), (50, 70), (1, 1)]:
        cost = torch.randn(shape, generator=g)

        def lap():
            r, c = wweight.linear_sum_assignment(cost.to(dev))
            got = float(cost.reshape(-1, *shape[-2:])[..., r.cpu(), c.cpu()].sum()) if cost.dim() == 2 else \
                sum(float(cost[b][r[b].cpu(), c[b].cpu()].sum()) for b in range(shape[0]))
            mats = [cost.numpy()] if cost.dim() == 2 else list(cost.numpy())
            want = sum(float(a[sp_lsa(a)].sum()) for a in mats)
            return abs(got - want) <= 1e-6 * max(1.0, abs(want)), f"objective {got:.9g} vs scipy {want:.9g}"
        rec.check(f"linear_sum_assignment {shape}", "torch", lap)
    del np


def check_selftests(rec: Recorder, dev):
    from wweight import _dispatch, _ext
    import wweight

    ext = _ext.cuda_extension()
    rec.note(f"wweight from {wweight.__file__}; CUDA extension: "
             f"{getattr(ext, '__file__', None) or 'absent: ' + str(_ext.cuda_extension_error())}")
    for fam in ("sparse", "quant"):
        for op, fn in _dispatch.backend_module(fam, "cuda").SELFTESTS.items():
            rec.check(f"selftest {fam}.{op}", "cuda", lambda: (bool(fn(dev)), "SELFTESTS against the reference"))
    b = cached(lambda: torch.randn(4097, device=dev))
    rec.check("auto dispatch picks cuda (strict)", "auto", lambda: (
        _dispatch.resolve("sparse_merge", dev, "auto", family="sparse", has_cpu=True) == "cuda"
        and wweight.merge_tensors("ties", b(), [b() + 1, b() - 1], density=0.3) is not None
        and all(_dispatch._selftest_results.values()), f"self-test results {_dispatch._selftest_results}"))


def check_big(rec: Recorder, be: str, dev, n: int = BIG_N, quant_be: Optional[str] = None):
    """bf16 tensor of ``n`` elements; ``h = n - 4097`` (2**31 for BIG_N) is the index the values straddle."""
    import wweight
    from wweight.reference import quant as RQ

    h, quant_be = n - 4097, quant_be or be
    if torch.device(dev).type == "cuda":
        free, need = torch.cuda.mem_get_info(dev)[0], 7 * n * 2
        if free < need:
            rec.note(f"> 2**31 check skipped on {be}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
            return
    x = torch.zeros(n, dtype=torch.bfloat16, device=dev)
    idx = torch.tensor([5, h - 1, h, h + 7, n - 1], device=dev)
    x[idx] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0], dtype=torch.bfloat16, device=dev)
    keep = torch.tensor([0.0, 0.0, 3.0, -4.0, 5.0])
    rec.check(f"big kth_largest_abs n={n}", be, lambda: (wweight.kth_largest_abs(x, 2, backend=be).item() == 4.0, "k=2 -> 4"))

    def kept(y):
        return bool(torch.equal(y[idx].float().cpu(), keep) and int(torch.count_nonzero(y)) == 3), f"{y[idx].tolist()}"
    rec.check(f"big sparsify magnitude n={n}", be, lambda: kept(wweight.sparsify(x, 3.5 / n, backend=be)))
    base = torch.zeros_like(x)
    rec.check(f"big merge ties K=2 n={n}", be, lambda: kept(wweight.merge_tensors(
        "ties", base, [x, x], density=3.5 / n, backend=be)))
    del base
    x.normal_(generator=torch.Generator(device=dev).manual_seed(0))

    def quant():  # blocks of 64 are independent: slices across h and the 1-element tail block vs the reference
        q = wweight.quantize(x, 4, 64, backend=quant_be)
        d = wweight.dequantize(q, backend=quant_be)
        for lo, hi in ((0, 256), (h - 256, h + 256), (h, n)):
            c, s, z, _, _ = RQ.quantize(x[lo:hi].cpu(), 4, 64)
            same = [torch.equal(q.codes[lo // 2:lo // 2 + c.numel()].cpu(), c),  # lo: a multiple of 8 codes
                    torch.equal(q.scale[lo // 64:-(-hi // 64)].cpu(), s),
                    torch.equal(q.zero[lo // 64:-(-hi // 64)].cpu(), z),
                    torch.equal(d[lo:hi].cpu(), RQ.dequantize(c, s, z, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                                            (hi - lo,), torch.bfloat16, 4, 64))]
            if not all(same):
                return False, f"slice [{lo}, {hi}): codes/scale/zero/dequant equal = {same}"
        return True, "3 slices identical to the reference"
    rec.check(f"big quantize+dequantize 4b/64 n={n}", quant_be, quant)


def check_sanitize_subset(rec: Recorder, dev):
    """The small subset run under compute-sanitizer: one of each kernel set, tiny odd sizes."""
    check_sparse(rec, "cuda", dev, shapes=[(4097,)], dtypes=("fp32", "bf16"), views=("offset",))
    check_quant(rec, "cuda", dev, shapes=[(24, 61)], dtypes=("fp32",))
    check_sparse(rec, "triton", dev, shapes=[(4097,)], dtypes=("bf16",), views=("contig",))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_cases")
    ap.add_argument("step", choices=["check-cuda", "check-triton", "big", "multi-gpu", "sanitize", "bench"])
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--device", default="cuda:0")
    a = ap.parse_args(argv)
    rec, dev = Recorder(a.jsonl), torch.device(a.device)
    torch.manual_seed(0)
    both = ("cuda", "triton")
    parts = {
        "check-cuda": [lambda: check_selftests(rec, dev), lambda: check_sparse(rec, "cuda", dev),
                       lambda: check_quant(rec, "cuda", dev)],
        "check-triton": [lambda: check_sparse(rec, "triton", dev), lambda: check_quant(rec, "triton", dev, matmul=True),
                         lambda: check_iso_permute(rec, dev)],
        "big": [lambda be=be: check_big(rec, be, dev) for be in both],
        "multi-gpu": [lambda be=be: check_sparse(rec, be, dev, shapes=[(4097,), (37, 29)], dtypes=("bf16",),
                                                 views=("offset",)) for be in both]
        + [lambda be=be: check_quant(rec, be, dev, shapes=[(24, 61)], dtypes=("fp32",)) for be in both],
        "sanitize": [lambda: check_sanitize_subset(rec, dev)],
        "bench": [lambda: __import__("benchmarks.gpu_bench", fromlist=["run_bench"]).run_bench(rec, dev)],
    }[a.step]
    for i, part in enumerate(parts):  # an error outside any check fails this part only
        rec.check(f"{a.step} part {i} ran to the end", "-", lambda: (part() is None, "ok"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{a.step}: {rec.failed} failed", flush=True)
    return 1 if rec.failed else 0


if __name__ == "__main__":
    sys.exit(main())
