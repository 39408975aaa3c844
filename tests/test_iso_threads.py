"""The CPU iso merges are independent of the thread count, the batch size and the other keys.

wweight.iso._threads runs each key's merge in one thread with torch / BLAS at one thread, so a
merge run with torch.set_num_threads(1) and with 2 threads (child processes: the thread pools are
process-wide) must give bit-identical results, and so must batch_size=1 vs one batch of all keys.
Both are also checked against the float64 reference (wweight.reference.iso), so a merge that is
merely deterministic but wrong fails too.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from wweight import iso
from wweight.reference import iso as ref

METHODS = ("iso_c", "iso_cts", "tsv_m")
# square (the Iso-CTS U_perp path), wide (m < n) and tall (m > n) keys, two of the square shape
SHAPES = {"sq0": (48, 48), "sq1": (48, 48), "wide": (24, 60), "tall": (60, 20)}

CHILD = r"""
import json, sys, torch
threads, method, batch_size, out = json.loads(sys.argv[1])
torch.set_num_threads(threads)
from wweight import iso
sys.path.insert(0, %r)
from test_iso_threads import task_set
base, fts = task_set()
res = iso.iso_merge_state_dicts(method, base, fts, batch_size=batch_size)
torch.save({k: v for k, v in res.items()}, out)
"""


def task_set(T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    return base, fts


def _child(tmp_path, threads, method, batch_size):
    out = str(tmp_path / f"{method}_{threads}_{batch_size}.pt")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    code = CHILD % os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code, json.dumps([threads, method, batch_size, out])], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("method", METHODS)
def test_threads_and_batch_bit_identical(tmp_path, method):
    one = _child(tmp_path, 1, method, None)
    two = _child(tmp_path, 2, method, None)
    two_b1 = _child(tmp_path, 2, method, 1)
    base, fts = task_set()
    exact = ref.iso_merge_state_dicts(method, {k: v.double() for k, v in base.items()},
                                      [{k: v.double() for k, v in f.items()} for f in fts],
                                      compute_dtype=torch.float64)
    for k in SHAPES:
        assert torch.equal(one[k], two[k]), f"{method} {k}: 1 vs 2 threads differ"
        assert torch.equal(two[k], two_b1[k]), f"{method} {k}: batch_size=None vs 1 differ"
        d, e = one[k].double() - base[k].double(), exact[k] - base[k].double()
        assert float((d - e).norm() / e.norm()) < 1e-4, f"{method} {k}: far from the float64 reference"


def test_thread_settings_restored():
    old = torch.get_num_threads()
    base, fts = task_set(T=3)
    iso.iso_merge_state_dicts("iso_cts", base, fts)
    assert torch.get_num_threads() == old


def test_worker_error_propagates():
    # a NaN task vector is caught before the decompositions; a bad method inside merge_batch is
    # refused with the argument named, from the CPU path too
    from wweight.iso import spectral

    with pytest.raises(ValueError, match="method"):
        spectral.merge_batch(torch.zeros(2, 2, 4, 4), "nope", 0.8, 1e-5)


def test_run_keys_order_and_first_error():
    # jobs run longest first with 2 workers; every job runs once; of several failures the one
    # first in the jobs list is raised, and jobs after a failure are not all started
    from wweight.iso import _threads

    ran, done = [], []

    def ok(i):
        return lambda: ran.append(i)

    _threads.run_keys([ok(i) for i in range(6)], [1, 5, 2, 6, 3, 4], 2, done.append)
    assert sorted(ran) == list(range(6)) and sum(done) == 6
    ran.clear()
    _threads.run_keys([ok(i) for i in range(4)], [1, 5, 2, 6], 1)
    assert ran == [0, 1, 2, 3]   # one worker: the given order

    def bad(i):
        def run():
            raise RuntimeError(f"job {i}")
        return run

    jobs = [ok(0), bad(1), ok(2), bad(3)]
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="job 1"):
            _threads.run_keys(jobs, [1, 1, 1, 1], workers)


def test_model_with_many_shapes_names_bad_key():
    # the CPU pool merges keys of all shapes together; a NaN in one key is still reported by name
    base, fts = task_set(T=3)
    fts[2]["wide"] = fts[2]["wide"].clone()
    fts[2]["wide"][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"finetuned\[2\]\['wide'\]"):
        iso.iso_merge_state_dicts("tsv_m", base, fts)
    assert torch.isfinite(fts[2]["wide"][0]).all()   # inputs untouched
