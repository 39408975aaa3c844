"""Benchmark entry point: ``python -m benchmarks FAMILY [options]``.

Families: sparse, della, methods, iso, permute, lap (the CPU LAP solvers alone), quant, checkpoint, fusion_bench.
Each writes ``benchmarks/results/<family>_<device>.json`` and ``.md`` (see benchmarks/common.py).
``sparse-bits`` compares the CPU sparse kernels' output bits with a record (benchmarks/sparse_bits.py).
``sparse-roofline`` times the fused sparse merges pass by pass against the memory floor (CPU).
``gpu-check`` validates a GPU end to end (benchmarks/gpu_check.py); without one it prints its plan.
"""
import importlib
import sys

FAMILIES = {
    "sparse": "benchmarks.bench_sparse",
    "della": "benchmarks.bench_della",       # fused DELLA vs the reference path vs mergekit (time, peak memory)
    "methods": "benchmarks.bench_methods",   # mergekit's other methods (wweight.interp) vs mergekit
    "iso": "benchmarks.bench_iso",
    "permute": "benchmarks.bench_permute",
    "lap": "benchmarks.bench_lap_cpu",
    "quant": "benchmarks.bench_quant",
    "checkpoint": "benchmarks.bench_checkpoint",
    "fusion_bench": "benchmarks.bench_fusion_bench",   # the FusionBench adapter vs FusionBench's algorithms
    "sparse-bits": "benchmarks.sparse_bits",   # not a family: the CPU sparse kernels' output bits vs the record
    "sparse-roofline": "benchmarks.sparse_roofline",   # the fused sparse merges pass by pass vs the memory floor
    "gpu-check": "benchmarks.gpu_check",  # not a family: validates a GPU (build, every kernel, sanitizer, smoke bench)
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FAMILIES:
        print(__doc__)
        print("usage: python -m benchmarks {" + ",".join(FAMILIES) + "} [--help]")
        return 2
    mod = importlib.import_module(FAMILIES[argv[0]])
    return mod.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
