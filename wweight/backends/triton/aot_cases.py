"""The launches the ahead-of-time check compiles: real op calls, recorded (``aot.py``, phase 1).

Run under ``TRITON_INTERPRET=1`` on CPU tensors: every call below goes through the public op, its
plan and its launcher exactly as on a GPU, and :func:`~wweight.backends.triton.launch.recording`
captures what each launch passes (dtypes, alignment, integer values, constexprs, options). The
calls cover every kernel in every mode the ops use, as a representative subset that compiles in
about two minutes on two cores:

* sparse: in fp32 every fused merge method and flag combination (mask modes none / window /
  two-sided window / random, tie ranks, consensus, normalize, lambda, with and without base),
  sparsify, the k-th largest select and the rescale statistics; in bf16 and fp16 one method per
  mask mode and consensus (each 16-bit rounding step); an odd-sized, unaligned K = 3 merge;
* quant: the one-pass kernel at 2/3/4/8 bits in fp32 and 4 bits in bf16/fp16, symmetric and
  not; the three-kernel path (block 100, outliers) per dtype; outlier masks, clipping, a
  "tensor" block and 16-/32-bit scales in fp32; dequantize of each; dequant_matmul per dtype;
* iso: the task-vector kernel per dtype with and without the per-task output;
* interp: slerp's blend, nearswap, RAM and RAM+ (both of its kernels) per dtype at K = 2, and an
  odd-sized, unaligned bf16 K = 3 call of each kernel but RAM's (RAM+ compiles the same merge kernel).
"""
from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
N = 4096        # divisible by 16, as real weights are: the size class that gets vectorised code
#: fused merge methods and the options that change the compiled kernel (K = 2 models; one K = 3)
MERGES = (
    ("linear", {}), ("linear", {"normalize": False}),
    ("task_arithmetic", {}), ("task_arithmetic", {"lambda_": 0.5}),
    ("ties", {}), ("ties", {"normalize": False, "lambda_": 0.7}),
    ("dare_ties", {"seed": 1}), ("dare_linear", {"seed": 2 ** 32 + 1, "rescale": True}),
    ("breadcrumbs", {}), ("breadcrumbs_ties", {}),
)
#: the 16-bit subset: every mask mode, consensus and the 16-bit rounding of each step
MERGES_16 = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties")


def _models(dt, n=N, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dt)
    ts = [base + 0.1 * torch.randn(n, generator=g).to(dt) for _ in range(K)]
    ts[1][::5] = ts[1][7]          # ties at the magnitude cuts: the tie-rank path
    return base, ts


def sparse_calls():
    import wweight

    for dt in DTYPES:
        base, ts = _models(dt)
        for method, kw in MERGES:
            if dt != torch.float32 and (method not in MERGES_16 or kw.get("normalize") is False):
                continue
            b = None if method == "linear" else base
            wweight.merge_tensors(method, b, ts, weights=[0.5, 1.0], density=0.4, backend="triton", **kw)
        sp = {torch.float32: "magnitude", torch.bfloat16: "random", torch.float16: "magnitude_outliers"}[dt]
        wweight.sparsify(ts[0] - base, 0.3, sp, seed=1, backend="triton")
        wweight.kth_largest_abs(ts[0], 17, backend="triton")
    # odd size, inputs one element into their storage (not 16-byte aligned), K = 3
    base, ts = _models(torch.bfloat16, n=3001, K=3)
    wweight.merge_tensors("ties", base[1:], [t[1:] for t in ts], weights=[1.0, 1.0, 1.0], density=0.5,
                          backend="triton")


def quant_calls():
    import wweight

    g = torch.Generator().manual_seed(1)
    for dt in DTYPES:
        w = torch.randn(32, 128, generator=g).to(dt)
        for bits in ((2, 3, 4, 8) if dt == torch.float32 else (4,)):
            for sym in (False, True):
                q = wweight.quantize(w, bits, 64, sym, backend="triton")                       # one pass
                wweight.dequantize(q, backend="triton")
        q = wweight.quantize(w, 3, 100, dt != torch.float32, outliers=0.01, backend="triton")   # three kernels
        wweight.dequantize(q, backend="triton")
        if dt == torch.float32:
            wweight.quantize(w, 4, 64, False, outliers=0.01, clip=0.9, backend="triton")
            wweight.quantize(w, 4, 64, True, outliers=torch.tensor([[3, 5]]), scale_dtype=torch.bfloat16,
                             backend="triton")
            wweight.quantize(w, 4, "tensor", True, outliers=0.001, scale_dtype=torch.float32, backend="triton")
        x = torch.randn(5, 128, generator=g).to(dt)
        wweight.dequant_matmul(x, wweight.quantize(w, 4, 64, False, backend="triton"), backend="triton")


def iso_calls():
    from wweight.backends.triton import iso

    for dt in DTYPES:
        base = torch.randn(N).to(dt)
        ft = [base + 0.01 * torch.randn(N).to(dt) for _ in range(2)]
        acc = torch.float64 if dt == torch.float32 else torch.float32
        each = torch.empty((2, N), dtype=acc)
        total = torch.empty(N, dtype=acc)
        bad = torch.empty(2, dtype=torch.int64)
        iso.task_vectors(base, ft, each, total, bad, acc)
        iso.task_vectors(base, ft, None, total, bad, acc)


def interp_calls():
    import wweight

    for dt in DTYPES:
        base, ts = _models(dt, K=2)
        wweight.merge_tensors("slerp", base, ts[:1], t=0.3, backend="triton")
        wweight.merge_tensors("nearswap", base, ts[:1], t=0.01, backend="triton")
        wweight.merge_tensors("ram", base, ts, backend="triton")
        wweight.merge_tensors("ramplus_tl", base, ts, backend="triton")
    # odd size, inputs one element into their storage (not 16-byte aligned), K = 3
    base, ts = _models(torch.bfloat16, n=3001, K=3)
    base, ts = base[1:], [t[1:] for t in ts]
    wweight.merge_tensors("slerp", base, ts[:1], t=0.3, backend="triton")
    wweight.merge_tensors("nearswap", base, ts[:1], t=0.01, backend="triton")
    wweight.merge_tensors("ramplus_tl", base, ts, backend="triton")


FAMILIES = {"sparse": sparse_calls, "quant": quant_calls, "iso": iso_calls, "interp": interp_calls}
