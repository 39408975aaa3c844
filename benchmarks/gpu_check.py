"""Validate a real GPU in one command: ``python -m benchmarks gpu-check [--out DIR] [--budget 480]``.

Steps (each time-boxed in its own process; a failing step is recorded and the next one runs; the exit
code is 1 if any step failed): versions; build the CUDA extension in place for this GPU's architecture
only; every CUDA and every Triton kernel of every op family against ``wweight.reference`` with
``WWEIGHT_STRICT=1`` and the backend forced (odd sizes, empty tensors, offset and transposed views);
one > 2**31-element bf16 tensor; a second GPU when present; ``compute-sanitizer`` memcheck and racecheck
on a small subset; a smoke benchmark (GB/s, % of the copy bandwidth measured in the same run, host syncs
per call). Writes ``gpu_check_<device-slug>.{json,md,log}`` under ``--out`` (default benchmarks/results).
Without a GPU (or with ``--plan``) it prints the plan and exits 0. The checks are benchmarks/gpu_cases.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# name -> (default time box in s, what it does); run in this order
STEPS = {
    "build": (240, "python setup.py build_ext --inplace with WWEIGHT_CUDA_ARCHS=<this GPU's sm> only, "
                   "WWEIGHT_BUILD_CUDA=1 (a failed build is fatal), WWEIGHT_BUILD_CPU=0"),
    "check-cuda": (120, "backend='cuda': {cuda}"),
    "check-triton": (150, "backend='triton': {triton}"),
    "big": (90, "cuda and triton: one bf16 tensor of {big} elements (> 2**31, if 7x4.3 GB is free): "
                "kth_largest_abs, sparsify, ties merge (planted values across index 2**31), quantize+dequantize "
                "4b/64 (slices vs the reference)"),
    "bench": (120, "copy bandwidth (torch.empty_like(x).copy_(x), 1 GiB, CUDA events), then {bench_ops} on "
                   "{bench_n} elements (bf16, fp32; K=4 merges) per backend cuda/triton: ms, GB/s, % of copy, "
                   "host syncs of one call (torch.cuda.set_sync_debug_mode)"),
    "memcheck": (120, "compute-sanitizer --tool memcheck on the subset (cuda: sparse fp32/bf16 4097 at an offset, "
                      "quant fp32 24x61; triton: sparse bf16 4097)"),
    "racecheck": (120, "compute-sanitizer --tool racecheck on the same subset"),
    "multi-gpu": (90, "when a second GPU is present: cuda and triton sparse (bf16 4097, 37x29 at an offset) and "
                      "quant (fp32 24x61) on cuda:1 while cuda:0 is current"),
}


# ----------------------------------------------------------------------------------------- pure helpers
def slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'."""
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def cuda_arch(cc: Tuple[int, int]) -> str:
    """(9, 0) -> '90' (the WWEIGHT_CUDA_ARCHS spelling)."""
    return f"{cc[0]}{cc[1]}"


def sanitizer_errors(text: str) -> Optional[int]:
    """Errors compute-sanitizer reported: memcheck's 'ERROR SUMMARY: N errors', racecheck's
    'RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)'; None if it printed no summary."""
    found = [int(m) for m in re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", text)]
    found += [int(m) for m in re.findall(r"RACECHECK SUMMARY:.*?\((\d+)\s+errors?", text)]
    return sum(found) if found else None


def sanitizer_unsupported(text: str) -> Optional[str]:
    """The line where compute-sanitizer says it cannot run on this machine (e.g. under gVisor), else None."""
    m = re.search(r"^.*(Device not supported|not supported on this (platform|system)|Unable to find injection).*$",
                  text, flags=re.M | re.I)
    return m.group(0).strip() if m else None


def step_timeout(want: float, deadline: float, now: float, floor: float = 15.0) -> Optional[float]:
    """A step's time box: its own, cut to what is left of the budget; None when under ``floor`` s remain."""
    left = deadline - now
    return None if left < floor else min(want, left)


def find_sanitizer(env=os.environ) -> Optional[str]:
    cands = [shutil.which("compute-sanitizer")]
    nvcc = shutil.which("nvcc")
    cands += [os.path.join(os.path.dirname(nvcc), "compute-sanitizer")] if nvcc else []
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        cands += [os.path.join(home, "bin", "compute-sanitizer")] if home else []
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def overall_ok(steps: List[dict]) -> bool:
    return all(s["status"] in ("ok", "skipped") for s in steps)


# ---------------------------------------------------------------------------------------- the plan
def plan(gpu: Optional[dict], sanitizer: Optional[str]) -> List[Tuple[str, int, str]]:
    from . import gpu_cases as C

    fill = dict(cuda=C.FAMILIES_BY_BACKEND["cuda"], triton=C.FAMILIES_BY_BACKEND["triton"], big=C.BIG_N,
                bench_ops=", ".join(C.BENCH_OPS), bench_n=C.BENCH_N)
    out = []
    for name, (t, what) in STEPS.items():
        what = what.format(**fill)
        if name in ("memcheck", "racecheck") and not sanitizer:
            what += " [compute-sanitizer not found: will be skipped with a note]"
        if name == "multi-gpu" and gpu is not None and gpu["count"] < 2:
            what += " [one GPU: will be skipped]"
        if name == "build" and gpu is not None:
            what = what.replace("<this GPU's sm>", gpu["arch"])
        out.append((name, t, what))
    return out


def print_plan(steps, gpu) -> None:
    from . import gpu_cases as C

    print("gpu-check plan (each step time-boxed in its own process, env WWEIGHT_STRICT=1, backend forced):")
    print(f"  0. versions: python, torch (+CUDA), triton, nvcc, driver (nvidia-smi), compute-sanitizer")
    for i, (name, t, what) in enumerate(steps, 1):
        print(f"  {i}. {name} (<= {t} s): {what}")
    print("  correctness cases (every backend against wweight.reference on CPU copies):")
    print(f"    shapes {C.SHAPES}, empty {C.EMPTY}; dtypes {list(C.DT)}; views contiguous, storage offset 3, "
          "transposed (2-D)")
    print(f"    kth_largest_abs k in {{1, n//3+1, n}}; sparsify {C.SPARSIFY}; merges {C.MERGES} (K=3)")
    print(f"    quant (bits, block, symmetric, outliers) {C.QUANT} on {C.QUANT_SHAPES}")
    print(f"    iso {C.ISO} on {C.ISO_SHAPES} (triton == torch, ~ reference)")
    print("  results: <--out>/gpu_check_<device-slug>.{json,md,log}; exit 1 on any mismatch or failed/unrun step")


# --------------------------------------------------------------------------------------- running
def run_boxed(cmd: List[str], timeout: float, env: Dict[str, str], log: str) -> Tuple[int, bool, float, str]:
    """(rc, timed_out, seconds, last 4000 chars of output); the whole process group dies on timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc, timed_out = p.wait(), True
    with open(log, errors="replace") as f:
        tail = f.read()[-4000:]
    return rc, timed_out, time.perf_counter() - t0, tail


def read_jsonl(path: str) -> Tuple[List[dict], List[str], List[dict]]:
    checks, notes, rows = [], [], []
    if os.path.exists(path):
        for line in open(path):
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            (notes.append(obj["note"]) if "note" in obj else rows.append(obj["row"]) if "row" in obj
             else checks.append(obj))
    return checks, notes, rows


def versions() -> Dict[str, str]:
    v = {"python": platform.python_version()}
    for mod in ("torch", "triton", "numpy", "scipy", "safetensors", "pybind11"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:
            v[mod] = f"missing ({type(e).__name__})"
    try:
        import torch

        v["torch.cuda"] = str(torch.version.cuda)
    except Exception:
        pass
    for key, cmd in (("nvcc", ["nvcc", "--version"]), ("driver", ["nvidia-smi", "--query-gpu=name,driver_version,"
                                                                  "memory.total", "--format=csv,noheader"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            v[key] = (out[-1] if key == "nvcc" else "; ".join(out)) if out else "no output"
        except Exception as e:
            v[key] = f"unavailable ({type(e).__name__})"
    v["compute-sanitizer"] = find_sanitizer() or "not found"
    return v


def gpu_info() -> Optional[dict]:
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return None
        cc = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "arch": cuda_arch(cc),
                "memory_GiB": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)}
    except Exception as e:
        print(f"gpu-check: torch.cuda failed: {e}")
        return None


def run_step(name: str, timeout: float, work: str, gpu: dict, sanitizer: Optional[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), WWEIGHT_STRICT="1",
               PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("WWEIGHT_BACKEND", None)
    log, jsonl = os.path.join(work, f"{name}.log"), os.path.join(work, f"{name}.jsonl")
    res = {"step": name, "status": "ok", "notes": [], "checks": [], "rows": []}
    if name == "multi-gpu" and gpu["count"] < 2:
        return dict(res, status="skipped", notes=["one GPU: no second device to test"], seconds=0)
    if name in ("memcheck", "racecheck") and not sanitizer:
        return dict(res, status="skipped", notes=["compute-sanitizer not on PATH, next to nvcc or in CUDA_HOME/bin"],
                    seconds=0)
    if name == "build":
        env.update(WWEIGHT_CUDA_ARCHS=gpu["arch"], WWEIGHT_BUILD_CUDA="1", WWEIGHT_BUILD_CPU="0")
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    else:
        step = "sanitize" if name in ("memcheck", "racecheck") else name
        cmd = [sys.executable, "-m", "benchmarks.gpu_cases", step, "--jsonl", jsonl,
               "--device", "cuda:1" if name == "multi-gpu" else "cuda:0"]
        if name in ("memcheck", "racecheck"):  # no caching allocator: memcheck sees each tensor's own bounds
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
            cmd = [sanitizer, "--tool", name, "--error-exitcode", "86", "--print-limit", "20"] + cmd
    rc, timed_out, secs, tail = run_boxed(cmd, timeout, env, log)
    checks, notes, rows = read_jsonl(jsonl)
    res.update(seconds=round(secs, 1), rc=rc, checks=checks, notes=notes, rows=rows)
    bad = [c for c in checks if not c.get("ok")]
    if name in ("memcheck", "racecheck"):
        errs, refused = sanitizer_errors(tail), sanitizer_unsupported(tail)
        if refused and not checks:  # the tool cannot run here: a limit of the machine, not a finding
            return dict(res, status="skipped", notes=[f"compute-sanitizer cannot run on this machine: {refused}"])
        res["notes"].append(f"compute-sanitizer {name}: {errs if errs is not None else 'no summary,'} errors reported")
        if errs:
            res["sanitizer_errors"] = errs
            bad = bad or [{"check": f"{name} summary", "backend": "cuda", "ok": False, "detail": f"{errs} errors"}]
    if timed_out:
        res["status"], res["error"] = "timeout", f"killed after {secs:.0f} s (time box {timeout:.0f} s)"
    elif rc != 0 or bad:
        res["status"] = "fail"
        res["error"] = f"rc {rc}, {len(bad)} of {len(checks)} checks failed" + ("" if checks else "; " + tail[-600:])
    print(f"gpu-check: {name}: {res['status']} in {secs:.0f} s, {len(checks) - len(bad)}/{len(checks)} checks ok"
          + (f" -- {res.get('error')}" if res["status"] != "ok" else ""), flush=True)
    for c in bad[:10]:
        print(f"    FAIL [{c.get('backend')}] {c.get('check')}: {c.get('detail')}")
    return res


def write_report(out: str, gpu: dict, vers: dict, steps: List[dict], ok: bool) -> str:
    base = os.path.join(out, f"gpu_check_{slug(gpu['name'])}")
    with open(base + ".json", "w") as f:
        json.dump({"ok": ok, "gpu": gpu, "versions": vers, "steps": steps, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                  f, indent=1, default=str)
    lines = [f"# gpu-check — {gpu['name']} ({gpu['count']} GPU, sm_{gpu['arch']}): {'PASS' if ok else 'FAIL'}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), "",
             "| step | status | s | checks ok | notes |", "|---|---|---|---|---|"]
    for s in steps:
        n_ok = sum(bool(c.get("ok")) for c in s["checks"])
        note = "; ".join(s["notes"] + ([s["error"]] if s.get("error") else [])).replace("|", "/").replace("\n", " ")
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '')} | {n_ok}/{len(s['checks'])} | {note[:300]} |")
    fails = [(s["step"], c) for s in steps for c in s["checks"] if not c.get("ok")]
    if fails:
        lines += ["", "## Failed checks", ""] + [f"- {st} [{c['backend']}] {c['check']}: {c['detail']}" for st, c in fails[:50]]
    rows = [r for s in steps if s["step"] == "bench" for r in s["rows"]]
    if rows:
        lines += ["", "## Smoke benchmark (GB/s = bytes read + written once / time)", "",
                  "| op | dtype | n | backend | ms | GB/s | % of copy | host syncs |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['dtype']} | {r['n']} | {r['backend']} | {r.get('ms', '')} | {r['GB/s']} | "
                  f"{r['%copy']} | {r.get('host_syncs', '')} |" for r in rows]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=RESULTS, help="directory of gpu_check_<slug>.{json,md,log}")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480 = 8 min)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list, subset of {','.join(STEPS)}")
    ap.add_argument("--no-build", action="store_true", help="use the CUDA extension already built/installed")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit 0")
    a = ap.parse_args(argv)
    t_start = time.time()
    wanted = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        ap.error(f"--steps: unknown {unknown} (known: {list(STEPS)})")
    vers = versions()
    print("gpu-check versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    gpu = gpu_info()
    sanitizer = find_sanitizer()
    steps = [s for s in plan(gpu, sanitizer) if s[0] in wanted and not (a.no_build and s[0] == "build")]
    print_plan(steps, gpu)
    if gpu is None or a.plan:
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False): printed the plan, ran nothing"
              if gpu is None else "gpu-check: --plan: ran nothing")
        return 0
    print(f"gpu-check: {gpu}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")  # per-step logs; all of them end up in one file under --out
    combined = os.path.join(a.out, f"gpu_check_{slug(gpu['name'])}.log")
    open(combined, "w").close()
    deadline, results = t_start + a.budget, []
    for name, t, _ in steps:
        box = step_timeout(t, deadline, time.time())
        if box is None:
            results.append({"step": name, "status": "not-run", "checks": [], "rows": [], "seconds": 0,
                            "notes": [f"out of the {a.budget:.0f} s budget"]})
            print(f"gpu-check: {name}: not run (budget spent)")
            continue
        try:
            results.append(run_step(name, box, work, gpu, sanitizer))
        except Exception as e:  # the harness itself failed on this step: record it, go on
            results.append({"step": name, "status": "fail", "checks": [], "rows": [], "notes": [],
                            "error": f"gpu-check raised {type(e).__name__}: {e}"})
        step_log = os.path.join(work, f"{name}.log")
        with open(combined, "a") as f:
            f.write(f"\n===== {name}: {results[-1]['status']} =====\n")
            f.write(open(step_log, errors="replace").read() if os.path.exists(step_log) else "(no output)\n")
    ok = overall_ok(results)
    base = write_report(a.out, gpu, vers, results, ok)
    print(open(base + ".md").read())
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-check: {'PASS' if ok else 'FAIL'} in {time.time() - t_start:.0f} s; wrote {base}.json/.md/.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
