"""Process set-up done before torch loads (imported first by ``wweight/__init__.py``)."""
import os
import sys


def _merge_command() -> bool:
    """This process is ``wweight merge ...`` (the console script or ``python -m wweight``)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in ("wweight", "wweight.cli"):
        rest = argv[argv.index("-m") + 2:]
    elif os.path.basename(sys.argv[0] or "") == "wweight":
        rest = sys.argv[1:]
    else:
        return False
    return bool(rest) and rest[0] == "merge"


# ``wweight merge`` runs its kernels (OpenMP) beside its reader / writer threads on the same cores.
# OpenMP's default wait policy spins idle workers for a while after every parallel region, and
# there the spinning took the cores the reads needed: in a perf profile (not committed) 21% of the CPU
# samples of a 125M-parameter merge on 2 cores were libgomp spin-waits. Measured with and without it
# (the same run_merge script, fresh processes alternating, best of 4, two rounds, 2026-12-02; not a
# results file): linear 0.38-0.51 s vs 0.53-0.58 s, TIES and DARE-TIES the same within the VM's noise.
# (benchmarks/results/checkpoint_cpu.md's wweight_s / wweight_inproc_s differ in more than the policy:
# a child process against the benchmark's own.) The policy is read when OpenMP starts (when torch
# loads), so it is set here, for the merge command only, and only if the user has not set it.
if _merge_command() and "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
