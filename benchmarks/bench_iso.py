"""Benchmark of the iso family: Iso-C, Iso-CTS and TSV-M on whole models.

``python -m benchmarks iso [--quick] [--device cuda] [--models vit,llama] [--tasks 8,14,20] [--layers N]``

Task sets (random weights ``0.02 * randn``, task vectors ``1e-3 * randn``):

* ``vit``: ViT-B/32 shaped, 12 layers x {attn in_proj 2304x768, out_proj 768x768, mlp c_fc
  3072x768, c_proj 768x3072} = 48 matrices (plus their biases), 8 / 14 / 20 tasks;
* ``llama``: Llama-7B shaped, 32 layers x {q, k, v, o 4096x4096, gate, up 11008x4096, down
  4096x11008} = 224 matrices, 8 tasks, bfloat16; the layers alias one random tensor per projection
  and model to fit 9 models in memory (use ``--layers`` to shorten: the per-key loop takes about
  an hour for 224 keys of Iso-CTS on one GPU).

For each method: wweight (``backend=auto``: batched Gram-eigh path) against the per-key reference
loop run the way the authors' code runs (one float32 ``torch.linalg.svd`` per matrix, Python loop:
``wweight.reference.iso`` with ``compute_dtype=float32``), on the same device in the same run: time,
peak GPU memory (CUDA only), and the relative Frobenius error of the merged task vector of both
against the float64 reference of the same definition (max over ``--error-keys`` keys per shape).

``--quick`` (CPU): 1 ViT layer at half width (4 matrices), 8 tasks, error on every key. Default sizes are the
GPU-sized sets above. The CPU results file is ``benchmarks/results/iso_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import bench, write_results
from wweight.methods import ISO_METHODS

VIT_SHAPES = {"attn.in_proj_weight": (2304, 768), "attn.out_proj.weight": (768, 768),
              "mlp.c_fc.weight": (3072, 768), "mlp.c_proj.weight": (768, 3072)}
LLAMA_SHAPES = {"q_proj.weight": (4096, 4096), "k_proj.weight": (4096, 4096), "v_proj.weight": (4096, 4096),
                "o_proj.weight": (4096, 4096), "gate_proj.weight": (11008, 4096), "up_proj.weight": (11008, 4096),
                "down_proj.weight": (4096, 11008)}


def make_task_set(model: str, layers: int, T: int, device, dtype=None, seed=0, width_scale=1.0):
    """(base, finetuned) state dicts. ViT: float32, every key its own tensors. Llama: bfloat16, and the
    32 layers share one random tensor per projection and model (dict entries alias the same storage),
    so 9 Llama-7B-sized models fit in memory; the merge does not know and computes every key."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = VIT_SHAPES if model == "vit" else LLAMA_SHAPES
    shapes = {k: (int(a * width_scale), int(b * width_scale)) for k, (a, b) in shapes.items()}
    dtype = dtype or (torch.float32 if model == "vit" else torch.bfloat16)
    share = model != "vit"

    def rnd(shape, scale):
        return (scale * torch.randn(shape, generator=g)).to(dtype).to(device)

    base = {}
    shared = {}
    for li in range(layers):
        for name, s in shapes.items():
            if share:
                if name not in shared:
                    shared[name] = rnd(s, 0.02)
                base[f"layers.{li}.{name}"] = shared[name]
            else:
                base[f"layers.{li}.{name}"] = rnd(s, 0.02)
                base[f"layers.{li}.{name[:-6]}bias"] = rnd((s[0],), 0.02)
    fts = []
    for _ in range(T):
        ft, cache = {}, {}
        for k, v in base.items():
            name = k.split(".", 2)[2]
            if share and name in cache:
                ft[k] = cache[name]
                continue
            ft[k] = (v.float() + 1e-3 * torch.randn(v.shape, generator=g).to(device)).to(dtype)
            cache[name] = ft[k]
        fts.append(ft)
    return base, fts


def rel_err(out, ref, base, keys):
    worst = 0.0
    for k in keys:
        d = out[k].double() - base[k].double()
        e = ref[k].double() - base[k].double()
        worst = max(worst, float((d - e).norm() / e.norm().clamp_min(1e-300)))
    return worst


def run_case(model, layers, T, methods, device, error_keys, rows, max_time, width_scale=1.0, warmup=1, iters=1):
    from wweight import iso
    from wweight.reference import iso as ref

    base, fts = make_task_set(model, layers, T, device, width_scale=width_scale)
    n2d = sum(1 for v in base.values() if v.dim() == 2)
    # keys whose error is checked against the float64 reference: the first error_keys of each shape
    by_shape = {}
    for k, v in base.items():
        if v.dim() == 2:
            by_shape.setdefault(tuple(v.shape), []).append(k)
    err_keys = [k for ks in by_shape.values() for k in ks[:error_keys]]
    sub_base = {k: base[k] for k in err_keys}
    sub_fts = [{k: f[k] for k in err_keys} for f in fts]
    is_cuda = torch.device(device).type == "cuda"
    for method in methods:
        res = {}

        def fast():
            res["fast"] = iso.iso_merge_state_dicts(method, base, fts)

        def loop():
            res["loop"] = ref.iso_merge_state_dicts(method, base, fts, compute_dtype=torch.float32)

        mem = {}
        for name, fn in (("fast", fast), ("loop", loop)):
            if is_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            try:
                t = bench(fn, device, warmup=warmup, iters=iters, max_time=max_time)
            except torch.linalg.LinAlgError as e:
                if name == "fast":
                    raise
                # the authors' float32 SVD does not converge on every matrix with every LAPACK (seen on
                # a Xeon VM, 2026-12-03, T=8 iso_cts): the loop has no time, the row says why
                res["loop_error"] = str(e).split(":")[0] + ": did not converge"
                res["loop"], t = None, None
            if is_cuda:
                mem[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
            res[name + "_t"] = t
        t0 = time.perf_counter()
        exact = ref.iso_merge_state_dicts(method, {k: v.double() for k, v in sub_base.items()},
                                          [{k: v.double() for k, v in f.items()} for f in sub_fts],
                                          compute_dtype=torch.float64)
        t64 = time.perf_counter() - t0
        shapes = sorted({tuple(v.shape) for v in base.values() if v.dim() == 2})
        fast_out, loop_out, eb = res["fast"], res["loop"], base
        if any(v.dtype != torch.float32 for v in sub_base.values()):
            # 16-bit models: measure the merged delta before it is rounded into base's dtype
            # (the float32 upcast of the inputs is exact, so the task vectors are the same)
            eb = {k: v.float() for k, v in sub_base.items()}
            ef = [{k: v.float() for k, v in f.items()} for f in sub_fts]
            fast_out = iso.iso_merge_state_dicts(method, eb, ef)
            loop_out = None if loop_out is None else ref.iso_merge_state_dicts(method, eb, ef,
                                                                                compute_dtype=torch.float32)
        row = {"model": model, "shapes": " ".join(f"{a}x{b}" for a, b in shapes), "matrices": n2d, "tasks": T, "method": method,
               "wweight_s": res["fast_t"], "loop_fp32_s": res["loop_t"],
               "speedup": None if res["loop_t"] is None else res["loop_t"] / res["fast_t"],
               "wweight_err": rel_err(fast_out, exact, eb, err_keys),
               "loop_fp32_err": None if loop_out is None else rel_err(loop_out, exact, eb, err_keys),
               "err_keys": len(err_keys), "ref_fp64_s": t64}
        if "loop_error" in res:
            row["loop_error"] = res["loop_error"]
        if is_cuda:
            row["wweight_peak_gib"] = mem["fast"]
            row["loop_peak_gib"] = mem["loop"]
        rows.append(row)
        print(row, flush=True)
        del res, exact, fast_out, loop_out
        if is_cuda:
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks iso", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="1 ViT layer at half width (1152x384, 384x384, 1536x384, 384x1536), 8 tasks: CPU in minutes")
    p.add_argument("--width-scale", type=float, default=None, help="scale every matrix dimension (quick: 0.5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (first calls are slow on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed runs, median reported (default 3; 1 on CPU unless --quick)")
    p.add_argument("--models", default=None, help="comma list of vit,llama (default: both; quick: vit)")
    p.add_argument("--tasks", default=None, help="comma list of task counts for vit (default 8,14,20)")
    p.add_argument("--layers", type=int, default=None, help="layers per model (default: full model)")
    p.add_argument("--methods", default=",".join(ISO_METHODS), help="comma list (default: every iso method)")
    p.add_argument("--error-keys", type=int, default=None, help="keys per shape checked vs float64 (default: all for vit, 1 for llama)")
    p.add_argument("--max-time", type=float, default=600.0)
    p.add_argument("--tag", default=None, help="results file suffix (default: the device tag, e.g. cpu)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    models = (args.models or ("vit" if args.quick else "vit,llama")).split(",")
    tasks = [int(t) for t in (args.tasks or ("8" if args.quick else "8,14,20")).split(",")]
    methods = args.methods.split(",")
    rows = []
    for model in models:
        layers = args.layers or (1 if args.quick else (12 if model == "vit" else 32))
        for T in (tasks if model == "vit" else [8]):
            # the float64 reference of every Llama key would take hours: 1 key per shape by default
            ek = args.error_keys or (10**9 if model == "vit" else 1)
            run_case(model, layers, T, methods, device, ek, rows, args.max_time,
                     width_scale=args.width_scale or (0.5 if args.quick else 1.0), warmup=args.warmup,
                     iters=args.iters or (3 if (args.quick or device.type == "cuda") else 1))
    cols = ["model", "shapes", "matrices", "tasks", "method", "wweight_s", "loop_fp32_s", "speedup", "wweight_err",
            "loop_fp32_err"] + (["loop_error"] if any("loop_error" in r for r in rows) else [])
    if device.type == "cuda":
        cols += ["wweight_peak_gib", "loop_peak_gib"]
    md = write_results("iso", device, rows, columns=cols, title="iso (Iso-C / Iso-CTS / TSV-M)", tag=args.tag,
                       extra={"args": vars(args), "load_average_at_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                              "reference_loop": "authors' algorithm: one float32 torch.linalg.svd per matrix, Python loop",
                              "error": "max relative Frobenius error of the merged task vector vs the float64 reference"})
    print(md)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
