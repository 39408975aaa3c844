"""wweight's FusionBench algorithms (wweight.integrations.fusion_bench) vs FusionBench's own.

Each run is a child process: it builds the pool (a pretrained MLP and K fine-tunes, seeded), resets
the peak-RSS counter (``/proc/self/clear_refs``), runs one algorithm's ``run(pool)`` ``--repeat``
times, and reports the minimum time and the peak RSS above the pool (models already resident), i.e.
the working memory of the algorithm. Same pool for both implementations; the results are compared
(TIES must be bit-identical, the iso methods within 1e-5 of each other).

    python -m benchmarks fusion_bench                    # CPU: 4 x 2048^2 layers (16.8M params), K = 4
    python -m benchmarks fusion_bench --width 1024 --tasks 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .common import device_name, write_results

CASES = {
    "ties": ("fusion_bench.method:TiesMergingAlgorithm", "wweight.integrations.fusion_bench:TiesMerging",
             dict(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum")),
    "iso_c": ("fusion_bench.method:IsotropicMergingInCommonSubspace", "wweight.integrations.fusion_bench:IsoCMerge",
              dict(scaling_factor=1.0)),
    "iso_cts": ("fusion_bench.method:IsotropicMergingInCommonAndTaskSubspace",
                "wweight.integrations.fusion_bench:IsoCTSMerge", dict(scaling_factor=1.0, common_space_fraction=0.8)),
    "tsv_m": ("fusion_bench.method.task_singular_vector:TaskSingularVectorMerging",
              "wweight.integrations.fusion_bench:TSVMerge", dict(alpha=1.0)),
}

CHILD = r"""
import importlib, json, sys, time, os, copy
import torch, torch.nn as nn
from fusion_bench.modelpool import BaseModelPool
target, kw, width, layers, tasks, repeat, out = json.loads(sys.argv[1])
torch.manual_seed(0)
base = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
fts = []
for _ in range(tasks):
    m = copy.deepcopy(base)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fts.append(m)
mod, name = target.split(":")
cls = getattr(importlib.import_module(mod), name)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
times, peak = [], 0
for _ in range(repeat):
    pool = BaseModelPool({"_pretrained_": copy.deepcopy(base), **{f"m{i}": m for i, m in enumerate(fts)}})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss("VmRSS")
    t0 = time.perf_counter()
    res = cls(**kw).run(pool)
    times.append(time.perf_counter() - t0)
    peak = max(peak, rss("VmHWM") - before)
torch.save(res.state_dict(), out)
print(json.dumps({"s": min(times), "peak": peak}))
"""


def _run(target, kw, a, out):
    arg = json.dumps([target, kw, a.width, a.layers, a.tasks, a.repeat, out])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env, cwd="/")
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks fusion_bench")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(CASES))
    a = ap.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.methods.split(","):
            fb, ww, kw = CASES[m]
            r_fb = _run(fb, kw, a, os.path.join(tmp, "fb.pt"))
            r_ww = _run(ww, kw, a, os.path.join(tmp, "ww.pt"))
            x, y = torch.load(os.path.join(tmp, "fb.pt")), torch.load(os.path.join(tmp, "ww.pt"))
            diff = max(float((x[k].double() - y[k].double()).norm() / x[k].double().norm().clamp_min(1e-30))
                       for k in x)
            rows.append({"method": m, "params": sum(v.numel() for v in x.values()), "K": a.tasks,
                         "fusion_bench_s": r_fb["s"], "wweight_s": r_ww["s"], "speedup": r_fb["s"] / r_ww["s"],
                         "fusion_bench_peak_MB": r_fb["peak"] / 1e6, "wweight_peak_MB": r_ww["peak"] / 1e6,
                         "max_rel_diff": diff})
            print(rows[-1], flush=True)
    md = write_results("fusion_bench", torch.device("cpu"), rows, title="FusionBench adapter",
                       extra={"threads": a.threads, "layers": f"{a.layers} x Linear({a.width}, {a.width}), fp32",
                              "what": "minimum of --repeat runs of Algorithm.run(pool); peak = RSS high-water mark "
                                      "above the resident pool during run", "device": device_name("cpu")})
    print(md)


if __name__ == "__main__":
    sys.exit(main())
