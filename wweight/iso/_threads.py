"""CPU execution of the iso merges: one key per thread, every library at one thread.

Why: on CPU the batched path ran SciPy's LAPACK (its own OpenBLAS thread pool, not torch's) next
to torch's OpenMP / MKL pool. On a shared 2-core machine both pools spin-wait against each
other and an ``eigh`` of a 768^2 Gram matrix took 0.08 ... 4.6 s (5-10x slower than at one BLAS
thread; benchmarks/results/iso_cpu.md). Here each key's whole merge runs in one thread with torch,
MKL and OpenBLAS limited to one thread, and ``torch.get_num_threads()`` keys run side by side
(torch releases the GIL; SciPy's ``eigh`` holds it, so eigendecompositions of different keys
serialise while their GEMMs overlap). Each key is computed by the same single-threaded code
whatever the thread count or batch size, so results are bit-identical across both
(tests/test_iso_threads.py). Working memory is that of ``workers`` keys at a time, not the batch.

The thread settings are process-wide while a batch runs (torch.set_num_threads and the
threadpoolctl BLAS limit) and restored afterwards.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_LOCK = threading.Lock()   # one batch at a time changes the process-wide thread settings
_CONTROLLER = None


def _blas_limit():
    """Context limiting the BLAS libraries loaded through NumPy / SciPy to one thread, or None when
    threadpoolctl is not installed (then :func:`scipy_ok` is False and eigh runs in torch)."""
    global _CONTROLLER
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - the dev environment has it
        return None
    if _CONTROLLER is None:
        import scipy.linalg  # noqa: F401  (load SciPy's OpenBLAS so that the controller sees it)

        _CONTROLLER = threadpoolctl.ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def scipy_ok() -> bool:
    """Whether SciPy's LAPACK may be used on CPU: only where its BLAS can be held to one thread."""
    try:
        import threadpoolctl  # noqa: F401
        import scipy.linalg  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


@contextlib.contextmanager
def single_threaded():
    """torch (OpenMP / MKL) and NumPy / SciPy BLAS at one thread inside; restored on exit."""
    with _LOCK:
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            lim = _blas_limit()
            with (lim if lim is not None else contextlib.nullcontext()):
                yield
        finally:
            torch.set_num_threads(old)


def per_key(deltas: torch.Tensor, merge_one: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """deltas (B, T, m, n) on CPU -> (B, m, n) float64: ``merge_one(deltas[i:i+1])[0]`` for each i,
    ``min(B, torch.get_num_threads())`` keys at a time, each in one thread."""
    B, _, m, n = deltas.shape
    out = torch.empty((B, m, n), dtype=torch.float64)
    workers = max(1, min(B, torch.get_num_threads()))

    def one(i):
        out[i] = merge_one(deltas[i:i + 1])[0]

    with single_threaded():
        if workers == 1:
            for i in range(B):
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wweight-iso") as ex:
                for f in [ex.submit(one, i) for i in range(B)]:
                    f.result()   # re-raises a worker's exception
    return out
