#!/usr/bin/env bash
# Static sm_90 machine-code figures of csrc/sparse.cu, no GPU needed:
#   benchmarks/sass_sparse.sh [git-rev]     (default: the working tree)
# Compiles sparse.cu to a cubin with the flags of setup.py, then prints one row per kernel
# instantiation: SASS instructions, registers, stack/local bytes, spill stores/loads, and whether
# 128-bit global loads/stores appear. Static counts only, not timings.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REV="${1:-}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [ -n "$REV" ]; then
    mkdir -p "$TMP/csrc"
    git -C "$ROOT" archive "$REV" csrc | tar -x -C "$TMP"
    SRC="$TMP/csrc"
else
    SRC="$ROOT/csrc"
fi
PY="${PYTHON:-python3}"
# cuobjdump: the CUDA toolkit's, else the copy bundled with triton's NVIDIA backend
CUOBJDUMP="$(command -v cuobjdump || "$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')"
DEMANGLE="$(command -v cu++filt || command -v c++filt)"
PBINC="$("$PY" -c 'import pybind11; print(pybind11.get_include())')"
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
nvcc -cubin -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr --fmad=false -DNDEBUG \
    -I"$PBINC" -I"$PYINC" -I"$SRC" "$SRC/sparse.cu" -o "$TMP/sparse.cubin"
"$CUOBJDUMP" -sass "$TMP/sparse.cubin" > "$TMP/sass.txt"
"$CUOBJDUMP" -res-usage "$TMP/sparse.cubin" > "$TMP/res.txt"
# one line per function: mangled name, instruction count, LDG.128 / STG.128 counts, spill ops
awk '
/Function :/ { if (f != "") print f, n, l, s, sp; f = $3; n = 0; l = 0; s = 0; sp = 0; next }
/^ +\/\*[0-9a-f]+\*\/ / {
    if ($0 ~ /NOP/ && $0 ~ /BRA/) next
    n++
    if ($0 ~ /LDG\.E\.128/ || $0 ~ /LDG\.E\.ENL2\.256/) l++
    if ($0 ~ /STG\.E\.128/) s++
    if ($0 ~ /STL|LDL/) sp++
}
END { if (f != "") print f, n, l, s, sp }' "$TMP/sass.txt" > "$TMP/counts.txt"
awk '
/Function / { sub(/:$/, "", $2); f = $2 }
/REG:/ { r = $0; sub(/.*REG:/, "", r); sub(/ .*/, "", r); st = $0; sub(/.*STACK:/, "", st); sub(/ .*/, "", st)
         lo = $0; sub(/.*LOCAL:/, "", lo); sub(/ .*/, "", lo); print f, r, st, lo }' "$TMP/res.txt" > "$TMP/res2.txt"
printf "%-58s %6s %4s %5s %5s %6s %6s %6s\n" kernel instr regs stack local ldg128 stg128 ldl/stl
join <(sort "$TMP/counts.txt") <(sort "$TMP/res2.txt") | while read -r f n l s sp r st lo; do
    name="$(echo "$f" | "$DEMANGLE" | sed -e 's/(anonymous namespace):://g' -e 's/(.*//' -e 's/void //')"
    printf "%-58s %6s %4s %5s %5s %6s %6s %6s\n" "$name" "$n" "$r" "$st" "$lo" "$l" "$s" "$sp"
done | sort
