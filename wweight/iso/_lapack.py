"""SciPy's LAPACK ``dsyevd`` / ``dsyevr`` called without the GIL, for the CPU iso merges.

Why: :mod:`._threads` runs one key per thread, but ``scipy.linalg.eigh`` holds the GIL through its
f2py wrapper, so the eigendecompositions of different keys ran one after the other (four 768^2
``syevd`` on two threads: 0.43 s against 0.13 s for one; here 0.23 s). These functions call the
*same* Fortran routines of the *same* library (SciPy's OpenBLAS, through the function pointers that
``scipy.linalg.cython_lapack`` exports) with the same arguments ``scipy.linalg.eigh`` passes: a
column-major copy of the matrix, ``uplo='L'``, the optimal workspace of a LAPACK size query,
``abstol=0`` -- so they return the same bits (tests/test_iso_lapack.py compares them with
``scipy.linalg.eigh``). ctypes releases the GIL for the duration of a foreign call.

Where the pointers cannot be had (an unusual SciPy build), :func:`available` is False and the
caller keeps ``scipy.linalg.eigh``.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import numpy as np

_P = ctypes.c_void_p
_FUNCS: Optional[dict] = None


def _load() -> dict:
    global _FUNCS
    if _FUNCS is not None:
        return _FUNCS
    funcs = {}
    try:
        from scipy.linalg import cython_lapack

        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        # Fortran calling convention: every argument by address; cython_lapack's signatures carry
        # no hidden string lengths (its wrappers are compiled for that) and use 32-bit int
        for name, nargs in (("dsyevd", 11), ("dsyevr", 21)):
            cap = cython_lapack.__pyx_capi__[name]
            sig = get_name(cap)
            if sig is None or b"int *" not in sig or b"long" in sig:
                raise TypeError(f"unexpected signature of {name}: {sig!r}")
            funcs[name] = ctypes.CFUNCTYPE(None, *([_P] * nargs))(get_ptr(cap, sig))
    except Exception:  # noqa: BLE001 - any failure means "use scipy.linalg.eigh"
        funcs = {}
    _FUNCS = funcs
    return funcs


def available() -> bool:
    """Whether the GIL-free ``dsyevd`` / ``dsyevr`` could be loaded."""
    return bool(_load())


def _ref(v):
    return ctypes.byref(v)


def _check(info: int, name: str):
    if info != 0:
        from numpy.linalg import LinAlgError

        if info < 0:
            raise LinAlgError(f"Illegal value in argument {-info} of internal {name}")
        raise LinAlgError(f"{name}: the algorithm failed to converge ({info})")


def syevd(g: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``scipy.linalg.eigh(g, driver="evd", check_finite=False)`` without the GIL: eigenvalues
    ascending (n,) and eigenvectors (n, n) (columns; a column-major array) of symmetric float64 ``g``
    (its lower triangle is read)."""
    f = _load()["dsyevd"]
    n = g.shape[0]
    a = np.array(g, dtype=np.float64, order="F", copy=True)
    w = np.empty(n, dtype=np.float64)
    jobz, uplo, nn, info = ctypes.c_char(b"V"), ctypes.c_char(b"L"), ctypes.c_int(n), ctypes.c_int(0)
    wq, iq = np.zeros(1, np.float64), np.zeros(1, np.int32)
    lw, liw = ctypes.c_int(-1), ctypes.c_int(-1)

    def call(work, iwork):
        f(_ref(jobz), _ref(uplo), _ref(nn), a.ctypes.data, _ref(nn), w.ctypes.data, work.ctypes.data, _ref(lw),
          iwork.ctypes.data, _ref(liw), _ref(info))

    call(wq, iq)   # workspace query
    _check(info.value, "dsyevd")
    lw.value, liw.value = max(1, int(wq[0])), max(1, int(iq[0]))
    call(np.empty(lw.value, np.float64), np.empty(liw.value, np.int32))
    _check(info.value, "dsyevd")
    return w, a


def syevr_top(g: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """``scipy.linalg.eigh(g, subset_by_index=[n-k, n-1], driver="evr", check_finite=False)``
    without the GIL: the k largest eigenvalues ascending (k,) and their eigenvectors (n, k)."""
    f = _load()["dsyevr"]
    n = g.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    a = np.array(g, dtype=np.float64, order="F", copy=True)
    w = np.empty(n, dtype=np.float64)
    z = np.empty((n, k), dtype=np.float64, order="F")
    isuppz = np.zeros(2 * n, dtype=np.int32)
    jobz, rng, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"I"), ctypes.c_char(b"L")
    nn, il, iu, m, info = ctypes.c_int(n), ctypes.c_int(n - k + 1), ctypes.c_int(n), ctypes.c_int(0), ctypes.c_int(0)
    vl, vu, abstol = ctypes.c_double(0.0), ctypes.c_double(1.0), ctypes.c_double(0.0)  # scipy's defaults
    wq, iq = np.zeros(1, np.float64), np.zeros(1, np.int32)
    lw, liw = ctypes.c_int(-1), ctypes.c_int(-1)

    def call(work, iwork):
        f(_ref(jobz), _ref(rng), _ref(uplo), _ref(nn), a.ctypes.data, _ref(nn), _ref(vl), _ref(vu), _ref(il),
          _ref(iu), _ref(abstol), _ref(m), w.ctypes.data, z.ctypes.data, _ref(nn), isuppz.ctypes.data,
          work.ctypes.data, _ref(lw), iwork.ctypes.data, _ref(liw), _ref(info))

    call(wq, iq)   # workspace query
    _check(info.value, "dsyevr")
    lw.value, liw.value = max(26 * n, int(wq[0])), max(10 * n, int(iq[0]))
    call(np.empty(lw.value, np.float64), np.empty(liw.value, np.int32))
    _check(info.value, "dsyevr")
    if m.value != k:
        from numpy.linalg import LinAlgError

        raise LinAlgError(f"dsyevr found {m.value} of the {k} requested eigenvalues")
    return w[:k], z
