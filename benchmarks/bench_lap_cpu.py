"""CPU benchmark of the exact LAP solvers: wweight's C++ LAPJV (``wweight.backends.cpu.permute.lap_solve``)
vs ``scipy.optimize.linear_sum_assignment`` vs ``lap.lapjv`` (peer), same run, same costs.

    python benchmarks/bench_lap_cpu.py [--quick] [--reps 5]

Dense random float64 costs (``torch.rand``): single problems n = 256 ... 4096 (one thread: a single
problem is not parallelised) and batches of 256 x (64x64) and 1024 x (128x128) (wweight: one call,
one problem per OpenMP thread; scipy and lap: a Python loop, one thread). Median of ``--reps`` runs;
every wweight value is checked against scipy's (rtol 1e-12). Writes ``benchmarks/results/lap_cpu.{json,md}``
(``run()`` returns the rows for ``python -m benchmarks permute``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402

TARGETS = "no slower than scipy at any size; >= 1.5x scipy for n >= 1024; 256 x 64x64 batch >= 1.7x a scipy loop"


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _machine():
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in info.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                model = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return model, cores


def _matmul_scaling():
    """The machine's own 1 -> 2 thread speedup on a compute-bound kernel (torch float64 matmul), measured in
    the same run: on a shared VM the second core is often busy, which caps any batch speedup."""
    a = torch.rand(1024, 1024, dtype=torch.float64)
    prev, out = torch.get_num_threads(), {}
    for t in (1, 2):
        torch.set_num_threads(t)
        out[t] = _median_time(lambda: a @ a, 5)[0]
    torch.set_num_threads(prev)
    return out[1] / out[2]


def run(quick=False, reps=5, seed=0):
    import scipy
    from scipy.optimize import linear_sum_assignment as sp_lsa

    from wweight.backends.cpu import permute as cp

    try:
        import lap
    except ImportError:
        lap = None
    if not cp.available():
        raise RuntimeError("wweight._cpu has no lap_solve: build the C++ extension first")
    g = torch.Generator().manual_seed(seed)
    cases = [(1, n) for n in ((256, 512, 1024) if quick else (256, 512, 1024, 2048, 4096))]
    cases += [(256, 64)] + ([] if quick else [(1024, 128)])
    rows = []
    for B, n in cases:
        cost = torch.rand(B, n, n, generator=g, dtype=torch.float64)
        a = cost.numpy()
        r = max(1, reps if n <= 2048 else min(reps, 3))
        t_ww, (col, _, _, status) = _median_time(lambda: cp.lap_solve(cost), r)
        t_sp, sp_out = _median_time(lambda: [sp_lsa(a[b]) for b in range(B)], r)
        t_lap = _median_time(lambda: [lap.lapjv(a[b]) for b in range(B)], r)[0] if lap is not None else None
        # a batch on one thread too: the machine's parallel scaling is part of the result
        t_ww1 = _median_time(lambda: cp.lap_solve(cost, threads=1), r)[0] if B > 1 else t_ww
        assert (status == 0).all()
        got = np.take_along_axis(a, col.numpy()[:, :, None], 2)[:, :, 0].sum(1)
        ref = np.array([a[b][rc[0], rc[1]].sum() for b, rc in enumerate(sp_out)])
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        assert err <= 1e-12, f"wweight value differs from scipy's: rel {err}"
        rows.append({"problem": f"{n}x{n}" if B == 1 else f"{B} x {n}x{n}", "B": B, "n": n,
                     "wweight_s": t_ww, "scipy_s": t_sp, "lapjv_s": t_lap,
                     "vs_scipy": t_sp / t_ww, "vs_lapjv": (t_lap / t_ww) if t_lap else None,
                     "wweight_1thread_s": t_ww1, "parallel_speedup": t_ww1 / t_ww,
                     "value_rel_err": err, "reps": r,
                     "threads": 1 if B == 1 else int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))})
        print(f"{rows[-1]['problem']:>16}: wweight {t_ww:.4f} s  scipy {t_sp:.4f} s  lapjv "
              f"{t_lap if t_lap is None else round(t_lap, 4)} s  -> {t_sp / t_ww:.2f}x scipy", flush=True)
    scaling = _matmul_scaling()
    model, cores = _machine()
    env = {"machine": f"{model}, {cores} cores", "scipy": scipy.__version__, "numpy": np.__version__,
           "lap": getattr(lap, "__version__", "absent"), "torch": torch.__version__, "targets": TARGETS,
           "machine_2thread_matmul_speedup": round(scaling, 2), "loadavg_at_end": _loadavg(),
           "note": ("batch rows use OpenMP's default thread count (threads); wweight_1thread_s is the same call on "
                    "one thread. parallel_speedup cannot exceed what the machine gives a second thread at the time: "
                    "machine_2thread_matmul_speedup measures that on a compute-bound torch matmul in the same run")}
    return rows, env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="n <= 1024, one batch")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    rows, env = run(quick=args.quick, reps=args.reps)
    md = write_results("lap", "cpu", rows, extra=env, tag="cpu-quick" if args.quick else "cpu",
                       title="Exact LAP on CPU (wweight C++ LAPJV vs scipy vs lap.lapjv)",
                       columns=["problem", "wweight_s", "scipy_s", "lapjv_s", "vs_scipy", "vs_lapjv", "threads",
                                "wweight_1thread_s", "parallel_speedup", "value_rel_err"])
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
