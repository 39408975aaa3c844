"""The iso family's contract: validation, batching of same-shape keys, ``torch.library`` ops.

Public entry points :func:`iso_merge_state_dicts` and :func:`iso_merge_tensors` (also reached
through ``wweight.merge_tensors`` / ``merge_state_dicts``); the method and the design are described
in :mod:`wweight.iso`, the batched linear algebra is :mod:`wweight.iso.spectral`, the task vectors
come from ``wweight/backends/{torch,triton}/iso.py``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import _dispatch
from .. import _validate as V
from ..methods import CSF, ISO_METHODS
from ..reference import iso as _ref
from ..reference.iso import RANK_RTOL
from . import _threads, spectral

COMPUTE_DTYPES = (torch.float32, torch.float64)

__all__ = ["ISO_METHODS", "iso_merge_tensors", "iso_merge_state_dicts", "RANK_RTOL"]


# ----------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("wweight::iso_merge_batch", mutates_args=())
def _iso_merge_batch(deltas: torch.Tensor, method: str, common_space_fraction: float,
                     rank_rtol: float) -> torch.Tensor:
    """deltas: (B, T, m, n) task vectors (for ``iso_c``: (B, 1, m, n) sums) -> (B, m, n) merged
    deltas in ``deltas.dtype``. The linear algebra runs in float64, one task at a time."""
    return spectral.merge_batch(deltas, method, common_space_fraction, rank_rtol).to(deltas.dtype)


@_iso_merge_batch.register_fake
def _(deltas, method, common_space_fraction, rank_rtol):
    B, _, m, n = deltas.shape
    return deltas.new_empty((B, m, n))


@torch.library.custom_op("wweight::iso_task_vectors", mutates_args=())
def _iso_task_vectors(base: torch.Tensor, finetuned: List[torch.Tensor], dtype: torch.dtype,
                      want_each: bool, want_sum: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors of one key: (each (T, *shape) or (0,), sum (*shape) or (0,), non-finite count (T,) int64)."""
    T = len(finetuned)
    dev = base.device
    each = torch.empty((T,) + tuple(base.shape), dtype=dtype, device=dev) if want_each else None
    total = torch.empty(base.shape, dtype=dtype, device=dev) if want_sum else None
    bad = torch.zeros(T, dtype=torch.int64, device=dev)
    name = "triton" if backend == "triton" and base.numel() else "torch"
    _dispatch.backend_module("iso", name).task_vectors(base.contiguous(), [f.contiguous() for f in finetuned],
                                                        each, total, bad, dtype)
    empty = torch.empty(0, dtype=dtype, device=dev)
    return (each if each is not None else empty, total if total is not None else empty.clone(), bad)


@_iso_task_vectors.register_fake
def _(base, finetuned, dtype, want_each, want_sum, backend):
    T = len(finetuned)
    each = base.new_empty((T,) + tuple(base.shape), dtype=dtype) if want_each else base.new_empty(0, dtype=dtype)
    total = base.new_empty(base.shape, dtype=dtype) if want_sum else base.new_empty(0, dtype=dtype)
    return each, total, base.new_empty((T,), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_common(method, alpha, common_space_fraction, compute_dtype, memory_budget, batch_size, rank_rtol):
    V.choice("method", method, ISO_METHODS)
    alpha = V.number("alpha", alpha)
    f = V.number("common_space_fraction", common_space_fraction, lo=0.0, hi=1.0, lo_open=True)
    if compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype!r}")
    for name, v in (("memory_budget", memory_budget), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    rtol = V.number("rank_rtol", rank_rtol, lo=0.0, hi=1.0)
    return alpha, f, rtol


def batch_bytes(method: str, B: int, T: int, m: int, n: int, cbytes: int) -> int:
    """Upper bound of the bytes one batch of ``B`` same-shape ``(m, n)`` keys allocates while it is
    merged (task vectors of ``T`` fine-tuned models in ``cbytes``-byte compute dtype, float64 work),
    not counting the inputs and the merged outputs (the caller holds those). Affine in ``B``.

    Counted from :mod:`.spectral` (r = min(m, n), 8 = float64): ``iso_c`` holds the (B, 1, m, n)
    stack, its float64 copy, ``q`` and the scaled ``q`` (``cbytes + 24`` per element) and up to three
    (B, r, r) float64 Gram / eigenvector / product arrays (24 per r^2); ``iso_cts`` / ``tsv_m`` hold
    the (B, T, m, n) stack, up to ~12 float64 (B, m, n)-sized arrays at once (sum, one task, its
    projection, the U / V slot stacks, both polar factors and their product) and up to eight r^2
    arrays. Once per batch, not per key: one key's task-vector temporaries (``4 m n cbytes``, before
    the decompositions) or SciPy's / LAPACK's per-key ``eigh`` output and workspace (~3 r^2 float64),
    whichever is larger. Measured peaks stay below it (tests/test_memory_budget.py).
    """
    mn, r2 = m * n, min(m, n) ** 2
    if method == "iso_c":
        per_key = mn * (cbytes + 24) + 24 * r2
    else:
        per_key = mn * (T * cbytes + 96) + 64 * r2
    return B * per_key + max(4 * mn * cbytes, 24 * r2) + (1 << 20)


def other_bytes(numel: int, cbytes: int) -> int:
    """Upper bound of one non-2-D key's temporaries (base, one model and its delta in the compute
    dtype, their running sum, the merged result): they are merged one key at a time."""
    return 6 * numel * cbytes + (1 << 16)


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


def _merge(method, base, finetuned, names, alpha, f, compute_dtype, memory_budget, batch_size, backend,
           rank_rtol, device, progress=False):
    """Core of both public functions; inputs already validated except for NaN/Inf."""
    T = len(finetuned)
    out: Dict[str, torch.Tensor] = {}
    groups: Dict[Tuple, List[str]] = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b.clone()  # e.g. BatchNorm's num_batches_tracked: nothing to merge
            continue
        dev = torch.device(device) if device is not None else b.device
        key = (tuple(b.shape), str(dev)) if b.dim() == 2 else ("other", str(dev))
        groups.setdefault(key, []).append(k)
    bar = None
    if progress:   # keys merged, advanced per batch (a batch of SVDs can take seconds)
        from tqdm import tqdm

        bar = tqdm(total=sum(len(v) for v in groups.values()), desc=f"merge {method}", unit="key")
    try:
        _merge_groups(method, base, finetuned, names, alpha, f, compute_dtype, memory_budget, batch_size, backend,
                      rank_rtol, T, out, groups, bar)
    finally:
        if bar is not None:
            bar.close()
    return {k: out[k] for k in base}  # base's key order


def _merge_groups(method, base, finetuned, names, alpha, f, compute_dtype, memory_budget, batch_size, backend,
                  rank_rtol, T, out, groups, bar):
    def done(n):
        if bar is not None:
            bar.update(n)

    def task_vectors(k, dev, be, want_each, want_sum):
        b = base[k].to(dev, non_blocking=True)
        fts = [ft[k].to(dev, non_blocking=True) for ft in finetuned]
        tvb = "triton" if be == "triton" else "torch"
        each, total, bad = _dispatch.run_op(_iso_task_vectors, b, fts, compute_dtype, want_each, want_sum, tvb)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{names(k, i)} - {names(k, None)} (task vector {i} of key {k!r}) contains NaN or Inf")
        return b, each, total

    cpu_keys: List[Tuple[str, int, int]] = []   # 2-D CPU keys, merged together after the loop
    cpu_bs = 1 << 62
    for gkey, keys in groups.items():
        dev = torch.device(gkey[1])
        be = _dispatch.resolve("iso_merge", dev, backend, family="iso", has_cuda=False, has_triton=True)
        if be == "reference":
            for k in keys:
                b = base[k].to(dev)
                tvs = [ft[k].to(dev) for ft in finetuned]
                for i, t in enumerate(tvs):
                    if not bool(torch.isfinite(t.to(compute_dtype) - b.to(compute_dtype)).all()):
                        raise ValueError(f"{names(k, i)} - {names(k, None)} (task vector {i} of key {k!r}) "
                                         "contains NaN or Inf")
                out[k] = _ref.iso_merge_tensors(method, b, tvs, alpha, f, compute_dtype, rank_rtol).to(base[k].device)
                done(1)
            continue
        if gkey[0] == "other":  # plain mean of the task vectors
            for k in keys:
                b, _, total = task_vectors(k, dev, be, False, True)
                res = b.to(compute_dtype) + (alpha / T) * total
                out[k] = res.to(base[k].dtype).to(base[k].device)
                done(1)
            continue
        m, n = gkey[0]
        if batch_size is not None:
            bs = batch_size
        else:
            budget = memory_budget if memory_budget is not None else _default_budget(dev)
            cbytes = torch.empty((), dtype=compute_dtype).element_size()
            fixed = batch_bytes(method, 0, T, m, n, cbytes)
            bs = max(1, (budget - fixed) // max(1, batch_bytes(method, 1, T, m, n, cbytes) - fixed))
        if dev.type == "cpu" and be != "triton":
            # CPU: every key of every shape is one job of one pool (below), at most bs at a time
            cpu_keys.extend((k, m, n) for k in keys)
            cpu_bs = min(cpu_bs, bs)
            continue
        for start in range(0, len(keys), bs):
            chunk = keys[start:start + bs]
            tt = 1 if method == "iso_c" else T
            stack = torch.empty((len(chunk), tt, m, n), dtype=compute_dtype, device=dev)
            bases = []
            for j, k in enumerate(chunk):
                b, each, total = task_vectors(k, dev, be, method != "iso_c", method == "iso_c")
                stack[j] = total.unsqueeze(0) if method == "iso_c" else each
                bases.append(b)
                del each, total
            merged = _dispatch.run_op(_iso_merge_batch, stack, method, f, rank_rtol)
            del stack
            for j, k in enumerate(chunk):
                out[k] = _merged_key(bases[j], merged[j], alpha, compute_dtype, base[k])
            del merged, bases
            done(len(chunk))
    if cpu_keys:
        _merge_cpu_keys(method, base, alpha, f, compute_dtype, rank_rtol, T, out, cpu_keys, cpu_bs,
                        task_vectors, done)


def _merged_key(b: torch.Tensor, merged: torch.Tensor, alpha: float, compute_dtype: torch.dtype,
                like: torch.Tensor) -> torch.Tensor:
    """``b + alpha * merged`` in ``compute_dtype``, returned in ``like``'s dtype and device."""
    return (b.to(compute_dtype) + alpha * merged).to(like.dtype).to(like.device)


def _merge_cpu_keys(method, base, alpha, f, compute_dtype, rank_rtol, T, out, keys, max_at_once,
                    task_vectors, done):
    """The 2-D CPU keys of all shapes as one pool of single-threaded jobs (:func:`._threads.run_keys`):
    ``torch.get_num_threads()`` keys at a time (at most ``max_at_once``, the smallest batch the
    memory budget allows), the most expensive first. Each key runs exactly the code of a
    one-key batch, so the results are those of any batch size or thread count."""
    dev = torch.device("cpu")
    tt = 1 if method == "iso_c" else T

    def job(k):
        def run():
            b, each, total = task_vectors(k, dev, "torch", method != "iso_c", method == "iso_c")
            stack = (total.unsqueeze(0) if method == "iso_c" else each).unsqueeze(0)   # (1, tt, m, n), no copy
            del each, total
            merged = _dispatch.run_op(_iso_merge_batch, stack, method, f, rank_rtol)
            del stack
            out[k] = _merged_key(b, merged[0], alpha, compute_dtype, base[k])
        return run

    costs = [tt * m * n * min(m, n) for _, m, n in keys]   # the GEMMs' flops, up to a constant
    workers = min(torch.get_num_threads(), max_at_once)
    _threads.run_keys([job(k) for k, _, _ in keys], costs, workers, done)


def iso_merge_state_dicts(method: str, base: Mapping[str, torch.Tensor],
                          finetuned: Sequence[Mapping[str, torch.Tensor]], alpha: float = 1.0,
                          common_space_fraction: float = CSF.default, compute_dtype: torch.dtype = torch.float32,
                          memory_budget: Optional[int] = None, batch_size: Optional[int] = None,
                          backend: Optional[str] = None, *, rank_rtol: float = RANK_RTOL,
                          device=None, progress: bool = False) -> Dict[str, torch.Tensor]:
    """Merge whole models with Iso-C, Iso-CTS or TSV-M; returns a new dict ``base + alpha * merged``.

    Args:
        method: ``"iso_c"``, ``"iso_cts"`` or ``"tsv_m"``.
        base: name -> tensor (any shapes; float32/float16/bfloat16/float64, non-floating keys are copied).
        finetuned: non-empty list of dicts with exactly base's keys, shapes, dtypes and devices.
        alpha: scale of the merged task vector (the papers tune it on validation data, 0.1 ... 3.0).
        common_space_fraction: Iso-CTS's ``f`` in (0, 1] (ignored by the other methods).
        compute_dtype: dtype of the task vectors and their sums (float32, or float64 for checking);
            eigendecompositions and the products using them always run in float64.
        memory_budget: bytes of working memory per batch of same-shape keys, inputs and outputs not
            counted (:func:`batch_bytes` is the bound it is held to; one key is the smallest unit).
            Default: half the free GPU memory on CUDA, 2 GiB on CPU.
        batch_size: keys per batch (overrides ``memory_budget``).
        backend: ``None``/"auto", "torch", "triton" (fused task-vector kernel + torch linear
            algebra), or "reference" (the authors' per-key SVD loop, in ``compute_dtype``).
        rank_rtol: singular values <= rank_rtol * scale count as zero (see wweight.reference.iso).
        device: where to compute (default: each key's device). Inputs are streamed there batch by
            batch and results copied back to base's devices, so a model larger than the GPU merges
            with only ``memory_budget`` on the GPU.
        progress: a tqdm bar of the keys merged, advanced per batch.

    Returns: dict with base's keys, dtypes and devices. Inputs are not modified.
    """
    alpha, f, rtol = _check_common(method, alpha, common_space_fraction, compute_dtype, memory_budget,
                                   batch_size, rank_rtol)
    _dispatch.requested(backend)
    if not isinstance(base, Mapping):
        raise TypeError(f"base must be a dict of name -> tensor, got {type(base).__name__}")
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
        raise TypeError(f"finetuned must be a list of dicts, got {type(finetuned).__name__}")
    if len(finetuned) == 0:
        raise ValueError("finetuned must hold at least one fine-tuned state dict, got an empty list")
    for i, ft in enumerate(finetuned):
        if not isinstance(ft, Mapping):
            raise TypeError(f"finetuned[{i}] must be a dict of name -> tensor, got {type(ft).__name__}")
        missing = [k for k in base if k not in ft]
        if missing:
            raise ValueError(f"finetuned[{i}] is missing key {missing[0]!r} of base ({len(missing)} missing)")
        extra = [k for k in ft if k not in base]
        if extra:
            raise ValueError(f"finetuned[{i}] has key {extra[0]!r} that base does not have ({len(extra)} extra)")
    for k, b in base.items():
        V.tensor(f"base[{k!r}]", b, floating=False)
        for i, ft in enumerate(finetuned):
            V.tensor(f"finetuned[{i}][{k!r}]", ft[k], floating=False)
            V.same_as(f"finetuned[{i}][{k!r}]", ft[k], f"base[{k!r}]", b)
        if b.is_floating_point() and b.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"base[{k!r}] has unsupported floating dtype {b.dtype}")

    def names(k, i):
        return f"base[{k!r}]" if i is None else f"finetuned[{i}][{k!r}]"

    with torch.no_grad():
        return _merge(method, base, finetuned, names, alpha, f, compute_dtype, memory_budget, batch_size,
                      backend, rtol, device, bool(progress))


def iso_merge_tensors(method: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], alpha: float = 1.0,
                      common_space_fraction: float = CSF.default, compute_dtype: torch.dtype = torch.float32,
                      backend: Optional[str] = None, *, rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """One key: ``base + alpha * merged_delta`` of fine-tuned ``tensors`` (list, same shape/dtype as base).

    2-D tensors get the spectral merge of ``method``; others the mean of the task vectors.
    Returns a new tensor in base's dtype and device. See :func:`iso_merge_state_dicts`.
    """
    alpha, f, rtol = _check_common(method, alpha, common_space_fraction, compute_dtype, None, None, rank_rtol)
    _dispatch.requested(backend)
    V.tensor("base", base)
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("tensors must hold at least one fine-tuned tensor, got an empty list")
    for i, t in enumerate(tensors):
        V.tensor(f"tensors[{i}]", t)
        V.same_as(f"tensors[{i}]", t, "base", base)

    def names(k, i):
        return "base" if i is None else f"tensors[{i}]"

    with torch.no_grad():
        return _merge(method, {"": base}, [{"": t} for t in tensors], names, alpha, f, compute_dtype, None, 1,
                      backend, rtol, None)[""]
