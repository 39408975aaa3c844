"""Every Triton kernel compiled for a real GPU, without one, and its machine code checked.

``TRITON_INTERPRET=1`` runs kernels with numpy semantics (exact division, no FMA contraction, no
integer specialisation, no grid limits, no alignment), so a kernel that has only been interpreted
is unproven. This tool closes that gap in two phases:

1. **record** (a subprocess under ``TRITON_INTERPRET=1``): the op calls of
   :mod:`~wweight.backends.triton.aot_cases` run through the real ops and launchers, and every
   launch (kernel, grid, argument dtypes / alignment / integer values, constexprs, options) is
   recorded (:func:`~wweight.backends.triton.launch.recording`);
2. **compile** (no interpreter): each distinct launch is specialised with Triton's own binder (the
   same code ``JITFunction.run`` uses, so 1-valued and 16-divisible integers are treated exactly as
   at run time) and compiled for ``GPUTarget("cuda", 90, 32)`` (and sm_80, one case per kernel)
   with the bundled ptxas. Every integer argument is also swept over 0, 1, 16 and 17 and 2**33
   (Triton makes 1 a constant and 2**33 a 64-bit argument) through the front end.

Checks per compiled kernel (:func:`analyse`): no approximate division (``div.full`` /
``div.approx`` / ``rcp.approx``) and no float FMA in the bit-exact kernels (all but
``quant._dq_matmul_kernel``, whose dot products are not bit-exact by nature), registers, spills and local
memory from ``cuobjdump --dump-resource-usage``, and the widest global load / store (16 bytes =
vectorised). ``python -m wweight.backends.triton.aot --json out.json --md out.md`` writes the table;
``tests/test_triton_aot.py`` runs it in CI and asserts on it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List

#: kernels whose results are compared bit for bit with the reference
NOT_BIT_EXACT = {"quant._dq_matmul_kernel"}
SWEEP = (0, 1, 16, 17, 2 ** 33)
_APPROX = re.compile(r"\b(div\.(?:full|approx)(?:\.ftz)?\.f32|rcp\.approx(?:\.ftz)?\.f(?:32|64))\b")
_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")
_MEM = re.compile(r"\b(ld|st)\.global(?:\.[a-zA-Z0-9_:]+)*?(?:\.v(2|4|8))?\.(?:b|u|s|f)(8|16|32|64)\b")


# ----------------------------------------------------------------------------- phase 1: record
def _encode(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "align16": v.data_ptr() % 16 == 0}
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    raise TypeError(f"cannot record a launch argument of type {type(v).__name__}")


def record(families) -> List[dict]:
    """Run the recorded op calls; one entry per launch (requires ``TRITON_INTERPRET=1``)."""
    from . import aot_cases
    from .launch import recording

    out = []
    for fam in families:
        with recording() as launches:
            aot_cases.FAMILIES[fam]()
        for kernel, grid, args, kwargs in launches:
            fn = kernel.fn
            out.append({"family": fam, "module": fn.__module__, "kernel": fn.__name__, "grid": list(grid),
                        "args": [_encode(a) for a in args], "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
    return out


# ----------------------------------------------------------------------------- phase 2: compile
def _decode(v):
    import torch

    if isinstance(v, dict):
        dt = getattr(torch, v["tensor"])
        buf = torch.zeros(64, dtype=dt)
        return buf if v["align16"] else buf[1:]     # one element in: not 16-byte aligned
    return v


def _kernel(entry):
    import importlib

    return getattr(importlib.import_module(entry["module"]), entry["kernel"])


def _bind(kernel, entry, arch, int_override=None):
    """(ASTSource, options, target) exactly as ``JITFunction.run`` would build them for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args = [_decode(a) for a in entry["args"]]
    if int_override is not None:
        args = [int_override if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
    kwargs = dict(entry["kwargs"])
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(kernel, sig, constexprs, attrs), options, target, backend


def _front_end(kernel, entry, value):
    """Triton's front end (Python AST -> TTIR) with every integer argument set to ``value``."""
    from triton._C.libtriton import ir

    src, options, target, backend = _bind(kernel, entry, 90, value)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)


def _resources(cubin: bytes) -> dict:
    from triton import knobs

    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")   # bundled with triton
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or tool
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        txt = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", txt)}
    return {"regs": res.get("reg", -1), "stack": res.get("stack", 0), "local": res.get("local", 0),
            "shared": res.get("shared", 0)}


def analyse(ptx: str) -> dict:
    """What the PTX promises: approximate divisions, float FMAs, widest global load / store (bytes)."""
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in _MEM.findall(ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits) // 8)
    return {"approx": sorted(set(_APPROX.findall(ptx))), "fma": len(_FMA.findall(ptx)),
            "ld_bytes": widest["ld"], "st_bytes": widest["st"],
            "spill_insts": len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
            "u64_atomics": len(re.findall(r"\batom\.global(?:\.\w+)*\.add\.u64\b", ptx))}


def compile_one(entry, arch=90, sweep=False) -> dict:
    """Compile one recorded launch for ``sm_<arch>``; with ``sweep`` also run the integer sweep."""
    import triton

    kernel = _kernel(entry)
    row = {"kernel": kernel_id(entry), "family": entry["family"], "arch": arch, "grid": entry["grid"],
           "modes": _modes(entry)}
    t0 = time.time()
    try:
        src, options, target, _ = _bind(kernel, entry, arch)
        ck = triton.compile(src, target=target, options=options.__dict__)
        row.update(analyse(ck.asm["ptx"]), **_resources(ck.asm["cubin"]), ok=True, error=None,
                   num_warps=ck.metadata.num_warps, fp_fusion=options.enable_fp_fusion)
    except Exception as e:  # recorded, asserted on by the test
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    if sweep:
        row["sweep"] = {}
        for v in SWEEP:
            try:
                _front_end(kernel, entry, v)
                row["sweep"][str(v)] = None
            except Exception as e:
                row["sweep"][str(v)] = f"{type(e).__name__}: {e}"[:500]
    row["seconds"] = round(time.time() - t0, 2)
    return row


def kernel_id(entry) -> str:
    """``<kernels module>.<kernel>``, e.g. ``sparse._stats_kernel`` (two families have a ``_stats_kernel``)."""
    return f"{entry['module'].rsplit('.', 1)[-1]}.{entry['kernel']}"


def _modes(entry) -> str:
    """The launch's specialisation in words: dtypes of the tensor arguments and the constexprs."""
    dts = sorted({a["tensor"] for a in entry["args"] if isinstance(a, dict)})
    flags = ",".join(f"{k}={v}" for k, v in entry["kwargs"].items() if k not in ("enable_fp_fusion",))
    aligned = all(a["align16"] for a in entry["args"] if isinstance(a, dict))
    return f"{'/'.join(dts)} {flags}{'' if aligned else ' unaligned'}"


def _key(entry):
    """Launches that compile to the same kernel: same kernel, types, alignment, constexprs and
    integer specialisation class (1 / 16-divisible / 32- or 64-bit)."""
    def cls(a):
        if isinstance(a, bool) or not isinstance(a, int):
            return json.dumps(a, sort_keys=True) if isinstance(a, dict) else type(a).__name__
        return ("one" if a == 1 else "d16" if a % 16 == 0 else "any") + ("64" if abs(a) >= 2 ** 31 else "32")
    return (entry["module"], entry["kernel"], tuple(cls(a) for a in entry["args"]),
            json.dumps(entry["kwargs"], sort_keys=True))


def distinct(entries) -> List[dict]:
    seen, out = set(), []
    for e in entries:
        k = _key(e)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


def run(families=("sparse", "quant", "iso", "interp"), jobs=None) -> dict:
    """Both phases; returns ``{"rows": [...], "launches": n, "seconds": s}``."""
    t0 = time.time()
    env = dict(os.environ, TRITON_INTERPRET="1")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "launches.json")
        subprocess.run([sys.executable, "-m", "wweight.backends.triton.aot", "--record", path, "--families", *families],
                       env=env, check=True)
        with open(path) as f:
            entries = json.load(f)
    uniq = distinct(entries)
    first_of = {}
    for e in uniq:
        first_of.setdefault(kernel_id(e), e)
    tasks = [(e, 90, first_of[kernel_id(e)] is e) for e in uniq] + [(e, 80, False) for e in first_of.values()]
    jobs = jobs or max(1, min(len(tasks), os.cpu_count() or 1))
    # longest first (the merge kernels), so the pool's last task is a short one
    tasks.sort(key=lambda t: (t[0]["kernel"] != "_merge_kernel", t[1]))
    with cf.ProcessPoolExecutor(jobs) as ex:
        rows = list(ex.map(_compile_task, tasks))
    import platform

    import triton
    import torch

    env = {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "host": f"{platform.machine()} x{os.cpu_count()}", "device": "none (ahead-of-time, GPUTarget cuda 90/80)"}
    return {"rows": rows, "launches": len(entries), "distinct": len(uniq), "seconds": round(time.time() - t0, 1),
            "env": env}


def _compile_task(task):
    entry, arch, sweep = task
    return compile_one(entry, arch, sweep)


def markdown(result) -> str:
    lines = ["# Triton kernels compiled for sm_90 / sm_80 ahead of time (no GPU)\n",
             f"{result['launches']} recorded launches, {result['distinct']} distinct specialisations, "
             f"{result['seconds']} s. Static facts of the compiled code, not GPU timings.\n",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in result.get("env", {}).items()) + "\n",
             "| kernel | arch | modes | ok | regs | spills (local B) | widest ld/st (B) | approx div | float FMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["family"], r["kernel"], r["arch"], r["modes"])):
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['modes']} | FAILED: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['modes']} | yes | {r['regs']} | {r['local']} "
                     f"| {r['ld_bytes']}/{r['st_bytes']} | {','.join(r['approx']) or '-'} | {r['fma']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m wweight.backends.triton.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--record", metavar="PATH", help=argparse.SUPPRESS)   # phase 1 (internal)
    ap.add_argument("--families", nargs="+", default=["sparse", "quant", "iso", "interp"])
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--md", metavar="PATH")
    a = ap.parse_args(argv)
    if not a.record and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the compile phase needs real JITFunctions: the interpreter replaces them at import time
        os.environ.pop("TRITON_INTERPRET")
        if any(m.startswith("wweight.kernels") for m in sys.modules):
            ap.error("unset TRITON_INTERPRET: the kernels were already imported under the interpreter")
    if a.record:
        with open(a.record, "w") as f:
            json.dump(record(a.families), f)
        return 0
    res = run(tuple(a.families), a.jobs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    md = markdown(res)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    else:
        print(md)
    return 0 if all(r["ok"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
