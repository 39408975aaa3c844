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
# samples of a 125M-parameter merge on 2 cores were libgomp spin-waits. In
# benchmarks/results/checkpoint_cpu.md, set up this way (wweight_s) against the library call with the
# default policy (wweight_inproc_s): linear 0.51 vs 0.79 s, TIES 1.17 vs 1.35 s, but DARE-TIES 1.82
# vs 1.70 s (slower). The policy is read when OpenMP starts (when torch loads), so it is set here,
# for the merge command only, and only if the user has not set it.
if _merge_command() and "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
