"""Static SASS figures of the quant CUDA kernels (no GPU needed): per kernel instantiation the
instruction count, registers, stack / local bytes (local > 0 means spills), 128-bit global loads
and calls into nvcc's 64-bit division routine, from ``cuobjdump -res-usage`` and ``-sass`` of a
cubin or of the built ``wweight/_cuda*.so``.

    python benchmarks/sass_quant.py before.cubin after.cubin > table.md

``cuobjdump`` is taken from $CUOBJDUMP, the PATH, or Triton's bundled copy. These are static
counts: they say what the compiler emitted, never how fast it runs.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import OrderedDict

from wweight.backends.cuda.aot import cuobjdump, res_usage


def _demangle(names):
    filt = shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


def _short(name: str) -> str:
    """'(anonymous namespace)::pack_kernel<float, 4>(...)' -> 'pack_kernel<float, 4>'."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"^\(anonymous namespace\)::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list after the template arguments
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut].replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("unsigned char", "u8")


def analyse(path: str, arch: str = "sm_90"):
    tool = cuobjdump()
    sass = subprocess.run([tool, "-arch", arch, "-sass", path], capture_output=True, text=True, check=True).stdout
    stats = OrderedDict((k, dict(reg=r["reg"], stack=r["stack"], local=r["local"], insts=0, ldg128=0, ldg=0, div64=0))
                        for k, r in res_usage(path, tool, arch).items())
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            stats.setdefault(cur, dict(reg=0, stack=0, local=0, insts=0, ldg128=0, ldg=0, div64=0))
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur:
            op = m.group(2)
            if op == "NOP":
                continue
            s = stats[cur]
            s["insts"] += 1
            if op.startswith("LDG"):
                s["ldg"] += 1
                s["ldg128"] += ".128" in op
            if op.startswith("CALL"):
                s["div64"] += 1
    names = _demangle(list(stats))
    return OrderedDict((_short(names[k]), v) for k, v in stats.items() if "quant" in names[k] or "kernel" in names[k])


def table(before: str, after: str) -> str:
    a, b = analyse(before), analyse(after)
    rows = ["| kernel | SASS insts before | after | regs before | after | stack/local before | after | "
            "LDG (128-bit) before | after | CALL (64-bit div) before | after |",
            "|---|---:|---:|---:|---:|---|---|---|---|---:|---:|"]
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)

        def f(d, key):
            return "–" if d is None else str(d[key])

        def sl(d):
            return "–" if d is None else f"{d['stack']}/{d['local']}"

        def ld(d):
            return "–" if d is None else f"{d['ldg']} ({d['ldg128']})"
        rows.append(f"| `{k}` | {f(x, 'insts')} | {f(y, 'insts')} | {f(x, 'reg')} | {f(y, 'reg')} | {sl(x)} | {sl(y)} "
                    f"| {ld(x)} | {ld(y)} | {f(x, 'div64')} | {f(y, 'div64')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1], sys.argv[2]))
