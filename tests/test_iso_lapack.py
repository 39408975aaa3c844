"""wweight.iso._lapack (GIL-free dsyevd / dsyevr) returns the bits of scipy.linalg.eigh."""
import threading

import numpy as np
import pytest

sl = pytest.importorskip("scipy.linalg")
threadpoolctl = pytest.importorskip("threadpoolctl")

from wweight.iso import _lapack  # noqa: E402

pytestmark = pytest.mark.skipif(not _lapack.available(), reason="scipy.linalg.cython_lapack pointers unavailable")


def _gram(n, m, seed, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n if rank is None else rank))
    if rank is not None:
        a = a @ rng.standard_normal((rank, n))
    return a.T @ a   # as the iso merges build them: float64, C order, symmetric up to rounding


@pytest.mark.parametrize("n,m,rank", [(1, 3, None), (7, 20, None), (64, 200, None), (257, 300, None),
                                      (300, 1000, 40)])
def test_syevd_bits(n, m, rank):
    g = _gram(n, m, n, rank)
    g[0, -1] += 1e-9   # not exactly symmetric: both must read the same (lower) triangle
    with threadpoolctl.threadpool_limits(1):
        w0, v0 = sl.eigh(g, driver="evd", check_finite=False)
        w1, v1 = _lapack.syevd(g)
    assert np.array_equal(w0, w1) and np.array_equal(v0, v1)


@pytest.mark.parametrize("n,k", [(5, 1), (64, 8), (257, 30), (300, 149)])
def test_syevr_top_bits(n, k):
    g = _gram(n, 2 * n, k)
    with threadpoolctl.threadpool_limits(1):
        w0, v0 = sl.eigh(g, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False)
        w1, v1 = _lapack.syevr_top(g, k)
    assert w1.shape == (k,) and v1.shape == (n, k)
    assert np.array_equal(w0, w1) and np.array_equal(v0, v1)


def test_input_not_modified_and_threads_agree():
    g = _gram(200, 400, 1)
    keep = g.copy()
    ref = _lapack.syevd(g)
    out = [None] * 4

    def run(i):
        out[i] = _lapack.syevd(g) if i % 2 else _lapack.syevr_top(g, 20)

    with threadpoolctl.threadpool_limits(1):
        ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        top = sl.eigh(g, subset_by_index=[180, 199], driver="evr", check_finite=False)
    assert np.array_equal(g, keep)
    for i, (w, v) in enumerate(out):
        e = ref if i % 2 else top
        assert np.array_equal(w, e[0]) and np.array_equal(v, e[1])


def test_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        _lapack.syevr_top(np.eye(3), 0)
