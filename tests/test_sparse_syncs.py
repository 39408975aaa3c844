"""Host <-> device synchronisations of one sparse merge (issue 11), modelled on CPU tensors.

CPU tensors never wait for a GPU, so the test *models* a CUDA run: a tensor is "on the device"
(:class:`_OnDevice`) when it is an input of the merge, made by a factory given ``device=``, moved by
``.to(device)``, returned by a backend primitive (the kernels write into device memory), or computed
from such a tensor. Under :class:`SyncCounter` a sync is then

* a read of an on-device tensor on the host: ``tolist``, ``item``, ``bool()``, ``int()``,
  ``float()``, ``cpu()``, ``numpy()``, ...; or an op whose output size depends on device data
  (``nonzero``, boolean-mask indexing, ``bincount``, ``unique``, ...);
* a pageable (blocking) host -> device copy: ``torch.tensor(values, device=...)``,
  ``host.to(device)`` without ``non_blocking=True``, a host tensor written into a device one.

Host-side tables (``torch.tensor(values)`` with no device) are free. The C++ ``cpu`` backend's
kernels take their small tables as lists, like the CUDA kernels take device pointers: reads inside
its primitives are not counted (they are host kernels). The ``torch`` backend is the fallback on a
GPU too, so everything it does counts.
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import wweight
from wweight import _dispatch
from wweight import methods as M
from wweight.sparse import merge as sparse_merge

MAX_SYNCS = 2   # per merged tensor: the radix-select result and the NaN/Inf flags


class _OnDevice(torch.Tensor):
    """A CPU tensor that would live in GPU memory in a CUDA run."""
    __torch_function__ = torch._C._disabled_torch_function_impl


_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "cpu", "numpy",
          "__array__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "bincount", "unique", "unique_consecutive",
                   "repeat_interleave", "equal", "allclose", "nonzero_static"}
_FACTORIES = {"tensor", "as_tensor"}


def _name(func) -> str:
    return getattr(func, "__name__", "") or str(func)


def _dev(x) -> bool:
    return isinstance(x, _OnDevice)


def _has_bool_index(idx) -> bool:
    leaves, _ = tree_flatten(idx)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in leaves)


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.syncs = []          # (kind, op, where)
        self._suspended = 0

    @contextlib.contextmanager
    def suspended(self):
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _count(self, kind, op):
        if self._suspended:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "/wweight/" in f.filename.replace("\\", "/")]
        where = f"{frames[-1].filename.rsplit('/wweight/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.syncs.append((kind, op, where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        leaves, _ = tree_flatten((args, kwargs))
        on_dev = any(_dev(x) for x in leaves)
        self_ = args[0] if args else None
        to_device = False
        if name in _READS and _dev(self_):
            self._count("device->host", name)
        elif name in _DATA_DEPENDENT and on_dev:
            self._count("device->host", name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and on_dev and \
                _has_bool_index(args[1] if len(args) > 1 else None):
            self._count("device->host", f"{name}[bool mask]")
        elif name in _FACTORIES and kwargs.get("device") is not None:
            to_device = True
            if not (args and _dev(args[0])):
                self._count("host->device", f"torch.{name}(device=)")
        elif name == "to" and isinstance(self_, torch.Tensor):
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None:
                to_device = True
                if not _dev(self_) and not non_blocking:
                    self._count("host->device", "Tensor.to(device)")
        elif name in ("__setitem__", "copy_") and _dev(self_):
            src = args[2] if name == "__setitem__" else args[1]
            if isinstance(src, torch.Tensor) and not _dev(src) and src.dim() > 0 \
                    and not kwargs.get("non_blocking", False):
                self._count("host->device", f"{name}(host tensor)")
        if kwargs.get("device") is not None:
            to_device = True
        out = func(*args, **kwargs)
        if not (on_dev or to_device):
            return out
        ids = {id(x) for x in leaves}

        def mark(r):
            if isinstance(r, torch.Tensor) and not _dev(r) and id(r) not in ids:
                return r.as_subclass(_OnDevice)
            return r
        return tree_map(mark, out)


class _Prims:
    """A backend's primitives whose outputs are on-device tensors (written by the kernels)."""

    def __init__(self, mod, counter: SyncCounter, host_kernels: bool):
        self._mod, self._counter, self._host = mod, counter, host_kernels

    def __getattr__(self, attr):
        fn = getattr(self._mod, attr)
        if not callable(fn):
            return fn

        def call(*a, **k):
            with self._counter.suspended() if self._host else contextlib.nullcontext():
                out = fn(*a, **k)
            return tree_map(lambda r: r.as_subclass(_OnDevice) if isinstance(r, torch.Tensor) and not _dev(r)
                            else r, out)
        return call


def count_syncs(monkeypatch, call, backend: str):
    """Run ``call()`` (one merge) under the model; returns the list of syncs."""
    counter = SyncCounter()
    real_primitives = sparse_merge.primitives
    monkeypatch.setattr(sparse_merge, "primitives",
                        lambda name: _Prims(real_primitives(name), counter, host_kernels=name == "cpu"))
    op = sparse_merge._merge_op
    body = getattr(op, "_init_fn", None)
    assert body is not None, "torch.library.custom_op keeps its function as _init_fn"
    # the custom op would run its body outside the mode: run the body itself
    monkeypatch.setattr(sparse_merge, "_merge_op", body)
    with counter:
        call()
    return counter.syncs


FUSED = [m for m in M.registered("sparse") if M.get(m).sparsification != "della_magprune"]


def _backends():
    out = ["torch"]
    if _dispatch.cpu_extension() is not None:
        out.insert(0, "cpu")
    return out


def _inputs(dtype, ties: bool):
    g = torch.Generator().manual_seed(11)
    n, K = 3000, 3
    base = torch.randn(n, generator=g).to(dtype)
    ts = [base + 0.1 * torch.randn(n, generator=g).to(dtype) for _ in range(K)]
    if ties:   # a group of equal magnitudes around every cut: the tie-rank pass runs too
        for t in ts:
            t[::2] = base[::2] + 0.05
    dev = [t.as_subclass(_OnDevice) for t in ts]
    return base.as_subclass(_OnDevice), dev, base, ts


def _merge(method, base, ts, backend):
    return wweight.merge_tensors(method, base, ts, weights=[0.5, 1.0, 0.7], density=0.4, gamma=0.05,
                                 seed=3, backend=backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("method", FUSED)
@pytest.mark.parametrize("dtype,ties", [(torch.float32, False), (torch.bfloat16, True), (torch.float32, True)])
def test_fused_merge_syncs_at_most_two(monkeypatch, method, backend, dtype, ties):
    bd, tsd, base, ts = _inputs(dtype, ties)
    got = {}
    syncs = count_syncs(monkeypatch, lambda: got.setdefault("out", _merge(method, bd, tsd, backend)), backend)
    assert len(syncs) <= MAX_SYNCS, f"{method} on {backend}: {len(syncs)} syncs: {syncs}"
    # the model changes nothing: same numbers as a plain run
    assert torch.equal(got["out"].as_subclass(torch.Tensor), _merge(method, base, ts, backend))


@pytest.mark.parametrize("backend", _backends())
def test_dare_rescale_and_lambda_syncs(monkeypatch, backend):
    bd, tsd, base, ts = _inputs(torch.float16, False)
    call = lambda: wweight.merge_tensors("dare_linear", bd, tsd, weights=[0.5, 1.0, 0.7], density=0.3,  # noqa
                                         lambda_=0.8, rescale=True, normalize=True, seed=5, backend=backend)
    assert len(count_syncs(monkeypatch, call, backend)) <= MAX_SYNCS


def test_nonfinite_input_still_raises_with_one_read(monkeypatch):
    bd, tsd, _, _ = _inputs(torch.float32, False)
    tsd[1][7] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        count_syncs(monkeypatch, lambda: _merge("ties", bd, tsd, _backends()[0]), _backends()[0])


def test_the_model_counts_syncs(monkeypatch):
    """The counter is not vacuous: each kind of sync it should see is seen."""
    x = torch.arange(6.0).as_subclass(_OnDevice)
    counter = SyncCounter()
    with counter:
        y = (x * 2).sum()
        float(y)                                    # device -> host
        x[x > 2].tolist()                           # boolean mask, then a read
        torch.tensor([1, 2], device=x.device)       # pageable host -> device
        torch.ones(3).to(x.device)                  # blocking host -> device
        torch.ones(3).to(x.device, non_blocking=True)
        wweight._ext.device_tensor([1, 2], torch.int64, x.device)
        torch.tensor([1.0, 2.0]).tolist()           # host table: free
        z = torch.zeros(4, device=x.device)         # device allocation: no sync
        bool(z.any())                               # device -> host
    kinds = [(k, op) for k, op, _ in counter.syncs]
    assert kinds == [("device->host", "__float__"), ("device->host", "__getitem__[bool mask]"),
                     ("device->host", "tolist"), ("host->device", "torch.tensor(device=)"),
                     ("host->device", "Tensor.to(device)"), ("device->host", "__bool__")], kinds
