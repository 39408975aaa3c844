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
# there the spinning took the cores the reads needed: 21% of the CPU samples of a 125M-parameter
# merge on 2 cores were libgomp spin-waits; with passive waiting the merge ran 1.3-1.5x faster
# (benchmarks/results/checkpoint_cpu.md). The policy is read when OpenMP starts (when torch loads),
# so it is set here, for the merge command only, and only if the user has not set it.
if _merge_command() and "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
