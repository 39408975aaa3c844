"""Issue 15: the checkpoint engine's recycled host buffers (``wweight/_pool.py``).

A recycled buffer holds the old contents of an earlier tensor, not the zeros of fresh pages, so
every kernel must write all of its output; and a buffer may only be recycled when nothing else can
reach it. Both are checked here against runs without the pool (a fresh allocation each time)."""
import os

import pytest
import torch
from safetensors.torch import save_file

from test_checkpoint_helpers import write_yaml
import wweight
from wweight import _pool
from wweight.checkpoint import load_checkpoint, run_merge
from wweight.config import load_config

BIG = 512 * 512   # float32 elements: 1 MiB, the smallest tensor the pool takes


def test_only_unreachable_tensors_are_kept():
    pool = _pool.BufferPool(1 << 30)
    a = torch.empty(BIG)
    assert pool.give([a]) == 0                     # still named by the caller
    lst = [torch.empty(BIG)]
    assert pool.give(lst) == 1 and lst == [] and pool.nbytes == 4 * BIG
    b = torch.empty(BIG)
    view = b[:10]
    lst = [b]
    del b
    assert pool.give(lst) == 0                     # a view still reaches the storage
    d = {"x": torch.empty(BIG)}
    assert pool.give([d["x"]]) == 0                # a dict still holds it
    assert pool.give([torch.empty(100)]) == 0      # small: malloc's heap, not pooled
    got = pool.take(4 * BIG)
    assert got is not None and got.numel() == 4 * BIG and pool.nbytes == 0
    assert pool.take(4 * BIG) is None
    del view, a


def test_cap_and_trim():
    pool = _pool.BufferPool(3 * 4 * BIG)
    for _ in range(5):
        pool.give([torch.empty(BIG)])
    assert pool.nbytes == 3 * 4 * BIG
    pool.trim(4 * BIG)
    assert pool.nbytes == 4 * BIG


def _poisoned_pool(like, n=4):
    """A pool full of NaN buffers of ``like``'s byte size: a kernel that skips an element shows it."""
    pool = _pool.BufferPool(1 << 30)
    for _ in range(n):
        pool.give([torch.full((like.nbytes,), 0xFF, dtype=torch.uint8)])
    return pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties",
                                    "della", "dare_linear"])
def test_kernels_write_every_element_of_a_recycled_output(method, dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2 * BIG, generator=g).to(dtype)
    ts = [base + 0.1 * torch.randn(2 * BIG, generator=g).to(dtype) for _ in range(3)]
    # zero deltas in a block: outputs there equal the base (a kernel skipping them would leave NaN)
    for t in ts:
        t[1000:5000] = base[1000:5000]
    kw = {} if method == "linear" else {"density": 0.3, "seed": 2}
    b = None if method == "linear" else base
    want = wweight.merge_tensors(method, b, ts, **kw)
    with _pool.active(_poisoned_pool(base)) as pool:
        got = wweight.merge_tensors(method, b, ts, **kw)
        if method != "della":   # della's fused kernel allocates its own output
            assert pool.hits >= 1
    assert torch.equal(got, want)


def test_sparsify_writes_every_element_of_a_recycled_output():
    x = torch.randn(2 * BIG, generator=torch.Generator().manual_seed(1))
    want = wweight.sparsify(x, density=0.2, method="magnitude")
    with _pool.active(_poisoned_pool(x)):
        got = wweight.sparsify(x, density=0.2, method="magnitude")
    assert torch.equal(got, want)


def _zoo(root, n_models=3):
    """A model of same-size 1 MiB+ tensors (buffers are recycled across keys) and fine-tunes."""
    g = torch.Generator().manual_seed(9)
    base = {f"layers.{i}.{n}": torch.randn(512, 520, generator=g) for i in range(4) for n in ("q", "k", "v")}
    base["norm"] = torch.randn(520, generator=g)
    dirs = []
    for j in range(n_models + 1):
        sd = base if j == 0 else {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = os.path.join(root, f"m{j}")
        os.makedirs(d)
        save_file(sd, os.path.join(d, "model.safetensors"))
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_engine_with_pool_matches_merge_tensors(tmp_path, method, monkeypatch):
    dirs = _zoo(str(tmp_path))
    base, models = dirs[0], dirs[1:]
    params = [{"weight": 0.5, "density": 0.4}] * 3 if method != "linear" else [{"weight": 0.3}] * 3
    cfg = write_yaml(tmp_path / "c.yaml", method, None if method == "linear" else base, models, params)
    stats = []
    real_clear = _pool.BufferPool.clear

    def clear(self):
        stats.append((self.hits, self.misses))
        real_clear(self)

    monkeypatch.setattr(_pool.BufferPool, "clear", clear)
    run_merge(load_config(cfg), str(tmp_path / "out"), progress=False, seed=3)
    assert stats and stats[0][0] > 0, stats   # buffers were recycled
    out = load_checkpoint(str(tmp_path / "out"))
    sds = [load_checkpoint(d) for d in dirs]
    for k, v in out.items():
        fts = [sd[k] for sd in sds[1:]]
        if method == "linear":
            want = wweight.merge_tensors("linear", None, fts, weights=[0.3] * 3)
        else:
            want = wweight.merge_tensors(method, sds[0][k], fts, weights=[0.5] * 3, density=0.4,
                                         seed=wweight.key_seed(3, k))
        assert torch.equal(v, want), k
