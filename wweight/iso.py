"""Isotropic merging of fine-tuned models: Iso-C, Iso-CTS and TSV-M, batched over all 2-D keys.

Papers: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025, Iso-C / Iso-CTS, github.com/danielm1405/iso-merging) and
Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025,
TSV-M). The exact definitions, and the two places where they had to be made well defined
(rank-deficient matrices, Iso-CTS with many tasks), are in :mod:`wweight.reference.iso`.

Task vectors are ``Delta_t = finetuned[t][key] - base[key]`` and the result is
``base + alpha * merged_delta``. 2-D floating keys get the spectral merge (embeddings and LM heads
included), other floating keys the mean of their task vectors, non-floating keys are copied.

How it is fast (``backend="torch"`` / ``"triton"``; ``"reference"`` runs the per-key loop):

* keys are grouped by shape and processed in batches whose size follows ``memory_budget`` /
  ``batch_size``; each batch is one set of batched GEMMs and batched symmetric eigendecompositions,
  with the task vectors visited one task at a time so the float64 working set is ~9 m n per key;
* every SVD is computed from the eigendecomposition of the *smaller* Gram matrix
  (``r x r``, ``r = min(m, n)``), formed and decomposed in float64: one GEMM of ``m n r`` flops
  plus an ``r x r`` ``eigh`` instead of a full SVD. In float64 this is *more* accurate than the
  authors' float32 SVD (it adds ~``1e-16 kappa^2`` relative error where a float32 SVD adds
  ~``6e-8 kappa``); what remains is the float32 rounding of the task vectors and of the result
  (benchmark: 2e-7 vs the float64 reference, where the authors' float32 loop has 3e-6 ... 7e-5);
* only the singular triplets that are used are formed (top ``(r-k)/T`` per task for Iso-CTS,
  ``int(r/T)`` for TSV-M; on CPU only those eigenpairs are computed, by LAPACK ``syevr``);
* Iso-CTS with ``m <= n``: ``(I - U_k U_k^T) Delta_t = U_perp (U_perp^T Delta_t)`` with ``U_perp``
  the remaining ``m - k`` left singular vectors of ``M`` (all of them are available from the
  ``m x m`` Gram matrix), so each task's SVD is that of an ``(m - k) x n`` matrix (~0.2 m rows);
* the orthogonal (polar) factors ``U V^T`` are ``A W`` with ``W = V Sigma^{-1} V^T`` from the
  same Gram eigendecomposition (no second SVD);
* the task vectors and their sum are built by one fused Triton kernel per fine-tuned tensor on
  GPU (``kernels/iso.py``; under ``TRITON_INTERPRET=1`` on CPU in the tests), which also counts
  NaN/Inf. There is no CUDA-extension kernel for this family (``csrc/iso.cu`` registers nothing).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import _dispatch
from . import _validate as V
from .reference import iso as _ref
from .reference.iso import RANK_RTOL, iso_cts_split

ISO_METHODS = ("iso_c", "iso_cts", "tsv_m")
COMPUTE_DTYPES = (torch.float32, torch.float64)
_LINALG = torch.float64  # Gram matrices, eigendecompositions and the products that use them

__all__ = ["ISO_METHODS", "iso_merge_tensors", "iso_merge_state_dicts", "RANK_RTOL"]


# ----------------------------------------------------------------------------------------------
# Batched spectral kernels (torch). All take and return float64 tensors with leading batch dims.
# ----------------------------------------------------------------------------------------------

def _eigh_desc(g: torch.Tensor, top: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric ``g`` (..., r, r), eigenvalues descending and clamped >= 0.

    ``top``: only the ``top`` largest eigenpairs are needed (the rest may be omitted). On CPU this
    uses LAPACK's ``syevr`` through SciPy for just those (2-5x faster than the full ``syevd``
    when ``top`` is a small fraction of r, as for TSV-M / Iso-CTS task triplets); on GPU
    ``torch.linalg.eigh`` (cuSOLVER).
    """
    r = g.shape[-1]
    if g.device.type == "cpu" and g.dtype == torch.float64 and r > 0 and g.numel() > 0:
        try:
            import scipy.linalg as sl
        except ImportError:  # pragma: no cover - scipy is a dependency
            sl = None
        if sl is not None:
            # SciPy's LAPACK: syevr for a few top pairs; syevd for all (15-25% faster than torch's
            # eigh on the CPUs measured)
            k = top if (top is not None and 0 < top < r // 2) else r
            flat = g.reshape(-1, r, r).numpy()
            lams, vecs = [], []
            for gi in flat:
                if k < r:
                    lam, vec = sl.eigh(gi, subset_by_index=[r - k, r - 1], driver="evr", check_finite=False)
                else:
                    lam, vec = sl.eigh(gi, driver="evd", check_finite=False)
                lams.append(torch.from_numpy(lam[::-1].copy()))
                vecs.append(torch.from_numpy(vec[:, ::-1].copy()))
            lam = torch.stack(lams).reshape(*g.shape[:-2], k)
            vec = torch.stack(vecs).reshape(*g.shape[:-2], r, k)
            return lam.clamp_min(0), vec
    lam, vec = torch.linalg.eigh(g)
    return lam.flip(-1).clamp_min(0), vec.flip(-1)


def _inv_kept(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def _polar(a: torch.Tensor, rtol: float) -> torch.Tensor:
    """``U V^T`` of ``a`` (..., m, n), singular values <= rtol * sigma_1 dropped (a partial isometry)."""
    m, n = a.shape[-2:]
    if min(m, n) == 0:
        return torch.zeros_like(a)
    if m >= n:  # a = U S V^T, a^T a = V S^2 V^T, U V^T = a V S^-1 V^T
        s2, v = _eigh_desc(a.mT @ a)
        s = s2.sqrt()
        w = (v * _inv_kept(s, s > rtol * s[..., :1]).unsqueeze(-2)) @ v.mT
        return a @ w
    s2, u = _eigh_desc(a @ a.mT)
    s = s2.sqrt()
    w = (u * _inv_kept(s, s > rtol * s[..., :1]).unsqueeze(-2)) @ u.mT
    return w @ a


def _top_triplets(a: torch.Tensor, p: int, scale: torch.Tensor, rtol: float):
    """Top-``p`` singular triplets of ``a`` (..., m, n): u (..., m, p), s (..., p), vh (..., p, n).

    Triplets with ``s <= rtol * scale`` (scale: (...,)) are zeroed (vectors and value).
    """
    m, n = a.shape[-2:]
    p = min(p, m, n)
    if m <= n:
        s2, u = _eigh_desc(a @ a.mT, p)
        s = s2[..., :p].sqrt()
        u = u[..., :p]
        keep = s > rtol * scale.unsqueeze(-1)
        inv = _inv_kept(s, keep)
        vh = (u * inv.unsqueeze(-2)).mT @ a
        u = u * keep.unsqueeze(-2).to(u.dtype)
    else:
        s2, v = _eigh_desc(a.mT @ a, p)
        s = s2[..., :p].sqrt()
        v = v[..., :p]
        keep = s > rtol * scale.unsqueeze(-1)
        inv = _inv_kept(s, keep)
        u = a @ (v * inv.unsqueeze(-2))
        vh = (v * keep.unsqueeze(-2).to(v.dtype)).mT
    return u, s * keep.to(s.dtype), vh


def _iso_c_batch(msum: torch.Tensor, rtol: float) -> torch.Tensor:
    """msum: (B, m, n) float64 sums of task vectors -> (B, m, n) Iso-C merged deltas."""
    m, n = msum.shape[-2:]
    r = min(m, n)
    if m >= n:
        s2, v = _eigh_desc(msum.mT @ msum)
        s = s2.sqrt()
        keep = s > rtol * s[..., :1]
        w = (v * _inv_kept(s, keep).unsqueeze(-2)) @ v.mT
        q = msum @ w
    else:
        s2, u = _eigh_desc(msum @ msum.mT)
        s = s2.sqrt()
        keep = s > rtol * s[..., :1]
        w = (u * _inv_kept(s, keep).unsqueeze(-2)) @ u.mT
        q = w @ msum
    # mean over all r singular values (the authors' S.mean()), dropped ones as exact zeros
    return q * ((s * keep).sum(-1) / r)[..., None, None]


def _task(d: torch.Tensor, t: int) -> torch.Tensor:
    """Task vector t of every key in the batch, (B, m, n) float64 (one task at a time bounds memory)."""
    return d[:, t].to(_LINALG)


def _sum_and_norms(d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 sum over tasks (B, m, n) and Frobenius norms (B, T) of the task vectors."""
    msum = torch.zeros(d.shape[0], *d.shape[2:], dtype=_LINALG, device=d.device)
    norms = []
    for t in range(d.shape[1]):
        dt = _task(d, t)
        msum += dt
        norms.append(torch.linalg.vector_norm(dt, dim=(-2, -1)))
    return msum, torch.stack(norms, dim=1)


def _iso_cts_batch(d: torch.Tensor, f: float, rtol: float) -> torch.Tensor:
    """d: (B, T, m, n) task vectors (any float dtype) -> (B, m, n) float64 Iso-CTS merged deltas."""
    B, T, m, n = d.shape
    r = min(m, n)
    k, p = iso_cts_split(r, T, f)
    msum, tnorm = _sum_and_norms(d)  # tnorm: scale of the task-triplet threshold

    # common subspace: top-k triplets of M
    if m <= n:
        s2, u_full = _eigh_desc(msum @ msum.mT)  # u_full: complete orthonormal basis of R^m
    else:
        s2, v_full = _eigh_desc(msum.mT @ msum)
    s = s2.sqrt()
    keep_c = s[..., :k] > rtol * s[..., :1]
    inv_c = _inv_kept(s[..., :k], keep_c)
    if m <= n:
        uk = u_full[..., :k] * keep_c.unsqueeze(-2).to(msum.dtype)
        vk = (uk * inv_c.unsqueeze(-2)).mT @ msum
    else:
        vk_cols = v_full[..., :k]
        uk = msum @ (vk_cols * inv_c.unsqueeze(-2))
        vk = (vk_cols * keep_c.unsqueeze(-2).to(msum.dtype)).mT
    sk = s[..., :k] * keep_c.to(s.dtype)
    del msum
    if p == 0:
        return (sk.sum(-1) / r)[..., None, None] * (_polar(uk, rtol) @ _polar(vk, rtol))

    # task-specific triplets of (I - U_k U_k^T) Delta_t, task by task, into their slots
    stack_u = torch.zeros(B, m, r, dtype=_LINALG, device=d.device)
    stack_v = torch.zeros(B, r, n, dtype=_LINALG, device=d.device)
    total_s = sk.sum(-1)
    # I - U_k U_k^T = U_perp U_perp^T when all k common directions are kept: the SVD of the
    # (m-k) x n matrix U_perp^T Delta_t gives the same singular values / right vectors, and the
    # left vectors U_perp @ u (m <= n only: then U of M is a complete basis)
    u_perp = u_full[..., k:] if (m <= n and bool(keep_c.all())) else None
    for t in range(T):
        dt = _task(d, t)
        if u_perp is not None:
            ut, st, vt = _top_triplets(u_perp.mT @ dt, p, tnorm[:, t], rtol)
            ut = u_perp @ ut
        else:
            ut, st, vt = _top_triplets(dt - uk @ (uk.mT @ dt), p, tnorm[:, t], rtol)
        pp = ut.shape[-1]  # < p only for matrices too small to have p triplets: slots stay zero
        stack_u[..., t * p:t * p + pp] = ut
        stack_v[..., t * p:t * p + pp, :] = vt
        total_s += st.sum(-1)
        del dt, ut, vt
    stack_u[..., T * p:] = uk
    stack_v[..., T * p:, :] = vk
    return (total_s / r)[..., None, None] * (_polar(stack_u, rtol) @ _polar(stack_v, rtol))


def _tsv_m_batch(d: torch.Tensor, rtol: float) -> torch.Tensor:
    """d: (B, T, m, n) task vectors (any float dtype) -> (B, m, n) float64 TSV-M merged deltas."""
    B, T, m, n = d.shape
    r = min(m, n)
    p = int(r * (1 / T))  # the authors' int(s.shape[0] * sv_reduction)
    if p == 0:
        return torch.zeros(B, m, n, dtype=_LINALG, device=d.device)
    # the r - T p slots left empty stay zero and drop out of polar(U) diag(S) polar(V)
    stack_u = torch.zeros(B, m, T * p, dtype=_LINALG, device=d.device)
    stack_s = torch.zeros(B, T * p, dtype=_LINALG, device=d.device)
    stack_v = torch.zeros(B, T * p, n, dtype=_LINALG, device=d.device)
    for t in range(T):
        dt = _task(d, t)
        ut, st, vt = _top_triplets(dt, p, torch.linalg.vector_norm(dt, dim=(-2, -1)), rtol)
        stack_u[..., t * p:(t + 1) * p] = ut
        stack_s[..., t * p:(t + 1) * p] = st
        stack_v[..., t * p:(t + 1) * p, :] = vt
        del dt, ut, vt
    return (_polar(stack_u, rtol) * stack_s.unsqueeze(-2)) @ _polar(stack_v, rtol)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("wweight::iso_merge_batch", mutates_args=())
def _iso_merge_batch(deltas: torch.Tensor, method: str, common_space_fraction: float,
                     rank_rtol: float) -> torch.Tensor:
    """deltas: (B, T, m, n) task vectors (for ``iso_c``: (B, 1, m, n) sums) -> (B, m, n) merged
    deltas in ``deltas.dtype``. The linear algebra runs in float64, one task at a time."""
    if method == "iso_c":
        out = _iso_c_batch(deltas.sum(1).to(_LINALG) if deltas.shape[1] > 1 else deltas[:, 0].to(_LINALG),
                           rank_rtol)
    elif method == "iso_cts":
        out = _iso_cts_batch(deltas, common_space_fraction, rank_rtol)
    elif method == "tsv_m":
        out = _tsv_m_batch(deltas, rank_rtol)
    else:
        raise ValueError(f"method must be one of {list(ISO_METHODS)}, got {method!r}")
    return out.to(deltas.dtype)


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
    if backend == "triton" and base.numel():
        from wweight.kernels import iso as _k

        _k.task_vectors(base.contiguous(), [f.contiguous() for f in finetuned], each, total, bad)
    else:
        b = base.to(dtype)
        for t, ft in enumerate(finetuned):
            dt = ft.to(dtype) - b
            if each is not None:
                each[t] = dt
            if total is not None:
                if t == 0:
                    total.copy_(dt)
                else:
                    total += dt
        # one finiteness pass: a NaN/Inf in any task vector reaches their sum (NaN + x = NaN,
        # Inf - Inf = NaN); only on failure are the tasks counted one by one
        probe = total if total is not None else each
        if probe is not None and not bool(torch.isfinite(probe).all()):
            for t, ft in enumerate(finetuned):
                bad[t] = (~torch.isfinite(ft.to(dtype) - b)).sum()
            if not bool(bad.any()):  # finite task vectors whose float sum overflowed
                bad[0] = 1
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


def _per_key_bytes(method: str, T: int, m: int, n: int, cbytes: int) -> int:
    """Working-set estimate of one 2-D key in a batch (inputs on device, task vectors, float64 work)."""
    mn = m * n
    if method == "iso_c":
        return mn * (cbytes * 2 + 8 * 4)
    # task vectors in compute dtype + float64: sum, one task (and its projection), slots, polar
    return mn * (cbytes * (T + 1) + 8 * 9)


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


def _merge(method, base, finetuned, names, alpha, f, compute_dtype, memory_budget, batch_size, backend,
           rank_rtol, device):
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

    def task_vectors(k, dev, be, want_each, want_sum):
        b = base[k].to(dev, non_blocking=True)
        fts = [ft[k].to(dev, non_blocking=True) for ft in finetuned]
        tvb = "triton" if be == "triton" else "torch"
        each, total, bad = _iso_task_vectors(b, fts, compute_dtype, want_each, want_sum, tvb)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{names(k, i)} - {names(k, None)} (task vector {i} of key {k!r}) contains NaN or Inf")
        return b, each, total

    for gkey, keys in groups.items():
        dev = torch.device(gkey[1])
        be = _dispatch.resolve("iso_merge", dev, backend, has_cuda=False, has_triton=True)
        if be == "reference":
            for k in keys:
                b = base[k].to(dev)
                tvs = [ft[k].to(dev) for ft in finetuned]
                for i, t in enumerate(tvs):
                    if not bool(torch.isfinite(t.to(compute_dtype) - b.to(compute_dtype)).all()):
                        raise ValueError(f"{names(k, i)} - {names(k, None)} (task vector {i} of key {k!r}) contains NaN or Inf")
                out[k] = _ref.iso_merge_tensors(method, b, tvs, alpha, f, compute_dtype, rank_rtol).to(base[k].device)
            continue
        if gkey[0] == "other":  # plain mean of the task vectors
            for k in keys:
                b, _, total = task_vectors(k, dev, be, False, True)
                res = b.to(compute_dtype) + (alpha / T) * total
                out[k] = res.to(base[k].dtype).to(base[k].device)
            continue
        m, n = gkey[0]
        if batch_size is not None:
            bs = batch_size
        else:
            budget = memory_budget if memory_budget is not None else _default_budget(dev)
            cbytes = torch.empty((), dtype=compute_dtype).element_size()
            bs = max(1, budget // max(1, _per_key_bytes(method, T, m, n, cbytes)))
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
            merged = _iso_merge_batch(stack, method, f, rank_rtol)
            del stack
            for j, k in enumerate(chunk):
                res = bases[j].to(compute_dtype) + alpha * merged[j]
                out[k] = res.to(base[k].dtype).to(base[k].device)
            del merged, bases
    return {k: out[k] for k in base}  # base's key order


def iso_merge_state_dicts(method: str, base: Mapping[str, torch.Tensor],
                          finetuned: Sequence[Mapping[str, torch.Tensor]], alpha: float = 1.0,
                          common_space_fraction: float = 0.8, compute_dtype: torch.dtype = torch.float32,
                          memory_budget: Optional[int] = None, batch_size: Optional[int] = None,
                          backend: Optional[str] = None, *, rank_rtol: float = RANK_RTOL,
                          device=None) -> Dict[str, torch.Tensor]:
    """Merge whole models with Iso-C, Iso-CTS or TSV-M; returns a new dict ``base + alpha * merged``.

    Args:
        method: ``"iso_c"``, ``"iso_cts"`` or ``"tsv_m"``.
        base: name -> tensor (any shapes; float32/float16/bfloat16/float64, non-floating keys are copied).
        finetuned: non-empty list of dicts with exactly base's keys, shapes, dtypes and devices.
        alpha: scale of the merged task vector (the papers tune it on validation data, 0.1 ... 3.0).
        common_space_fraction: Iso-CTS's ``f`` in (0, 1] (ignored by the other methods).
        compute_dtype: dtype of the task vectors and their sums (float32, or float64 for checking);
            eigendecompositions and the products using them always run in float64.
        memory_budget: bytes of working memory per batch of same-shape keys (an estimate; one key
            is the smallest unit). Default: half the free GPU memory on CUDA, 2 GiB on CPU.
        batch_size: keys per batch (overrides ``memory_budget``).
        backend: ``None``/"auto", "torch", "triton" (fused task-vector kernel + torch linear
            algebra), or "reference" (the authors' per-key SVD loop, in ``compute_dtype``).
        rank_rtol: singular values <= rank_rtol * scale count as zero (see wweight.reference.iso).
        device: where to compute (default: each key's device). Inputs are streamed there batch by
            batch and results copied back to base's devices, so a model larger than the GPU merges
            with only ``memory_budget`` on the GPU.

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
                      backend, rtol, device)


def iso_merge_tensors(method: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], alpha: float = 1.0,
                      common_space_fraction: float = 0.8, compute_dtype: torch.dtype = torch.float32,
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
