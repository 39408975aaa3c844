"""CPU execution of the iso merges: one key per thread, every library at one thread.

Why: on CPU the batched path ran SciPy's LAPACK (its own OpenBLAS thread pool, not torch's) next
to torch's OpenMP / MKL pool. On a shared 2-core machine both pools spin-wait against each
other and an ``eigh`` of a 768^2 Gram matrix took 0.08 ... 4.6 s (5-10x slower than at one BLAS
thread; benchmarks/results/iso_cpu.md). Here each key's whole merge runs in one thread with torch,
MKL and OpenBLAS limited to one thread, and ``torch.get_num_threads()`` keys run side by side
(torch releases the GIL, and so do the LAPACK eigensolvers, :mod:`._lapack`). Each key is computed
by the same single-threaded code whatever the thread count or batch size, so results are
bit-identical across both (tests/test_iso_threads.py). Working memory is that of ``workers`` keys
at a time, not the batch.

Two entry points: :func:`per_key` for one batch of same-shape keys (the ``wweight::iso_merge_batch``
op), and :func:`run_keys` for whole models (:mod:`.ops`): every 2-D key of every shape is one job,
the most expensive first, so a model whose shapes have one key each (or an odd count) still keeps
every core busy. Inside a :func:`run_keys` job, :func:`per_key` runs its keys in the calling thread.

The thread settings are process-wide while a batch runs (torch.set_num_threads and the
threadpoolctl BLAS limit) and restored afterwards.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from typing import Callable, Optional, Sequence

import torch

_LOCK = threading.Lock()   # one batch at a time changes the process-wide thread settings
_CONTROLLER = None
_JOB = threading.local()   # .on: this thread runs a run_keys job (thread settings already held at 1)


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

    if getattr(_JOB, "on", False):   # inside a run_keys job: its thread is this batch's one worker
        for i in range(B):
            one(i)
        return out
    with single_threaded():
        if workers == 1:
            for i in range(B):
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wweight-iso") as ex:
                for f in [ex.submit(one, i) for i in range(B)]:
                    f.result()   # re-raises a worker's exception
    return out


def run_keys(jobs: Sequence[Callable[[], None]], costs: Sequence[float], workers: int,
             done: Optional[Callable[[int], None]] = None) -> None:
    """Run ``jobs`` (each merges one key and stores its result), ``workers`` at a time, each in one
    thread under :func:`single_threaded`, in decreasing ``costs`` (longest first: the last job to
    start is a short one; one worker: in the given order). ``done(1)`` is called in this thread as
    each job finishes. If jobs fail, the ones not started are cancelled, the running ones finish,
    and the exception of the failed job that comes first in ``jobs`` is raised.
    """
    def run(i):
        _JOB.on = True
        try:
            jobs[i]()
        finally:
            _JOB.on = False

    workers = max(1, min(int(workers), len(jobs)))
    with single_threaded():
        if workers == 1:   # in the given order: the first job to fail is the first failed in jobs
            for i in range(len(jobs)):
                run(i)
                if done is not None:
                    done(1)
            return
        order = sorted(range(len(jobs)), key=lambda i: -costs[i])   # stable: ties keep the given order
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wweight-iso") as ex:
            futs = {ex.submit(run, i): i for i in order}
            failed = False
            for f in as_completed(futs):
                if f.exception() is not None:
                    failed = True
                    for g in futs:
                        g.cancel()   # the ones not started; the running ones finish
                    break
                if done is not None:
                    done(1)
            if failed:
                wait(futs)
                errs = [f for f in futs if not f.cancelled() and f.exception() is not None]
                raise min(errs, key=lambda f: futs[f]).exception()
