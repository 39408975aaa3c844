"""Shared benchmark plumbing: timing, copy bandwidth, environment record, result files.

Every family's benchmark builds a list of row dicts and calls ``write_results``; the JSON
holds the environment (device, versions) and every figure, the markdown is a short table.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# a benchmark measures the backend it names: a CUDA kernel failing its self-test is an error, not a
# silent fallback to another backend (wweight._dispatch, strict mode)
os.environ.setdefault("WWEIGHT_STRICT", "1")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def device_tag(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-").lower()
    return "cpu"


def cpu_model() -> str:
    """The host CPU's model name and its widest x86 vector extension (Linux), else ''."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
    return f"{name} ({isa})" if name and isa else name


def environment(device) -> Dict[str, str]:
    env = {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for mod in ("triton", "numpy", "scipy", "mergekit", "bitsandbytes"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    if torch.device(device).type == "cuda":
        env["cuda"] = torch.version.cuda
    cpu = cpu_model()
    if cpu:   # the CI VM's CPU changes between days (a Zen 4 EPYC, a Xeon): say which one measured
        env["cpu"] = cpu
    try:
        from wweight import _ext

        env["wweight_cuda_extension"] = "built" if _ext.cuda_extension() is not None else "absent"
    except Exception:
        pass
    return env


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device, *, warmup: int = 2, iters: int = 10,
          min_time: float = 0.0, max_time: float = 30.0) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    t_start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > max_time and len(times) >= 1:
            break
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Measured device copy bandwidth in GB/s (read + write bytes per second) of ``dst.copy_(src)``."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * n * 4 / t / 1e9


def write_results(family: str, device, rows: Sequence[dict], *, extra: Optional[dict] = None,
                  columns: Optional[Sequence[str]] = None, title: Optional[str] = None,
                  tag: Optional[str] = None) -> str:
    """Write ``results/<family>_<tag>.json`` and ``.md``; returns the markdown table."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    tag = tag or device_tag(device)
    env = environment(device)
    payload = {"family": family, "environment": env, "rows": list(rows)}
    if extra:
        payload.update(extra)
    base = os.path.join(RESULTS_DIR, f"{family}_{tag}")
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, base + ".json")
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = [f"# {title or family} benchmark — {env['device']}", ""]
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"))
    if extra:
        for k, v in extra.items():
            if not isinstance(v, (dict, list)):
                lines.append(f"- {k}: {v}")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    with open(base + ".md.tmp", "w") as f:
        f.write(md)
    os.replace(base + ".md.tmp", base + ".md")
    return md


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)
