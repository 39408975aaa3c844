"""Plain-PyTorch reference of isotropic merging: Iso-C, Iso-CTS and TSV-M, one key at a time.

Papers:
* Iso-C / Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces" (ICML 2025); authors' code github.com/danielm1405/iso-merging,
  ``src/utils/iso.py``.
* TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
  (CVPR 2025); code ``src/utils/TSVM_utils.py`` (``compute_and_sum_svd_mem_reduction``).

This module follows that code line by line (one ``torch.linalg.svd`` per matrix, Python loop over
keys and tasks) and is the float64 ground truth of ``wweight.iso``. It differs from the authors'
code only where their result is not defined or their code crashes:

1. **Rank-deficient matrices.** Where a matrix has (numerically) zero singular values its singular
   vectors for them are arbitrary, so the authors' ``U @ V`` is not unique (it depends on the
   LAPACK build). Here a singular triplet counts as zero when ``sigma <= rank_rtol * scale`` and
   its vectors are dropped (zeroed):

   * ``polar(A)`` (the orthogonal factor ``U V^T``) keeps only triplets with
     ``sigma > rank_rtol * sigma_1(A)``: it is the unique partial isometry of the polar
     decomposition of ``A``; for a full-rank ``A`` it is exactly the authors' ``U @ V``;
   * the common subspace of Iso-CTS keeps the top-k triplets of ``M`` with
     ``sigma > rank_rtol * sigma_1(M)``;
   * the task triplets (Iso-CTS and TSV-M) keep those with ``sigma > rank_rtol * ||Delta_t||_F``.

   Dropped triplets still count in the mean of the singular values (as zeros), as in the
   authors' code, so on full-rank inputs nothing changes. ``rank_rtol`` defaults to
   :data:`RANK_RTOL` (1e-5), about 100x the float32 rounding of a computed zero singular value.
2. **Iso-CTS split with more tasks than the formula allows.** The authors compute
   ``k = r - round((r - int(r f)) / T) * T``; when that is negative (e.g. r=10, f=0.1, T=16)
   their slicing crashes. Here the number of task dimensions is capped at ``floor(r / T)``
   per task (see :func:`iso_cts_split`). Python's ``round`` (half to even) is kept.
3. The authors skip CLIP's ``text_projection`` (2-D) by name; here every 2-D floating key gets
   the spectral treatment (embeddings and LM heads included) and every other floating key the
   mean of the task vectors. Non-floating keys (e.g. ``num_batches_tracked``) are copied from base.

Shapes: a task vector ``Delta_t`` of a 2-D key is ``(m, n)``; ``r = min(m, n)``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..methods import ISO_METHODS

RANK_RTOL = 1e-5


def iso_cts_split(r: int, n_tasks: int, common_space_fraction: float) -> Tuple[int, int]:
    """(k, p): common-subspace size and task-specific dimensions per task of Iso-CTS.

    Authors: ``k = int(r f)``; ``k = r - round((r - k) / T) * T``; ``p = int((r - k) / T)``.
    Deviation (their code crashes there): the task-specific total is capped at ``floor(r/T)*T``.
    """
    k = int(r * common_space_fraction)
    per_task = min(round((r - k) / n_tasks), r // n_tasks)
    k = r - per_task * n_tasks
    return k, per_task


def polar(a: torch.Tensor, rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """Orthogonal polar factor ``U V^T`` of ``a`` (..., m, n), dropping singular values <= rank_rtol*sigma_1."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = (s > rank_rtol * s[..., :1]).to(a.dtype)
    return (u * keep.unsqueeze(-2)) @ vh


def iso_c(task_vectors: Sequence[torch.Tensor], rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """Iso-C merged delta of one 2-D key: ``mean(S) * U V^T`` of ``M = sum_t Delta_t``.

    The mean is over all ``min(m, n)`` singular values of M, those counted as zero (see the module
    docstring) as exact zeros.
    """
    m_sum = sum(task_vectors)
    u, s, vh = torch.linalg.svd(m_sum, full_matrices=False)
    keep = (s > rank_rtol * s[:1]).to(s.dtype)
    return (s * keep).mean() * ((u * keep) @ vh)


def iso_cts(task_vectors: Sequence[torch.Tensor], common_space_fraction: float = 0.8,
            rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """Iso-CTS merged delta of one 2-D key (authors' ``iso_cts``; see the module docstring)."""
    T = len(task_vectors)
    m, n = task_vectors[0].shape
    r = min(m, n)
    k, p = iso_cts_split(r, T, common_space_fraction)
    m_sum = sum(task_vectors)
    u, s, vh = torch.linalg.svd(m_sum, full_matrices=False)
    keep = (s[:k] > rank_rtol * s[:1]).to(s.dtype)
    common_u = u[:, :k] * keep
    common_s = s[:k] * keep
    common_v = vh[:k, :] * keep[:, None]

    zeros = dict(dtype=m_sum.dtype, device=m_sum.device)
    stack_u = torch.zeros(m, r, **zeros)
    stack_s = torch.zeros(r, **zeros)
    stack_v = torch.zeros(r, n, **zeros)
    for i, w in enumerate(task_vectors):
        # remove the common *left* subspace only, as the authors do
        w_ts = w - common_u @ (common_u.T @ w)
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        keep_t = (s_ts[:p] > rank_rtol * torch.linalg.norm(w)).to(s.dtype)
        stack_u[:, i * p:(i + 1) * p] = u_ts[:, :p] * keep_t
        stack_s[i * p:(i + 1) * p] = s_ts[:p] * keep_t
        stack_v[i * p:(i + 1) * p, :] = v_ts[:p, :] * keep_t[:, None]
    stack_u[:, T * p:T * p + k] = common_u
    stack_s[T * p:T * p + k] = common_s
    stack_v[T * p:T * p + k, :] = common_v
    return stack_s.mean() * (polar(stack_u, rank_rtol) @ polar(stack_v, rank_rtol))


def tsv_m(task_vectors: Sequence[torch.Tensor], rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """TSV-M merged delta of one 2-D key: top int(r/T) triplets per task, polar(U) diag(S) polar(V)."""
    T = len(task_vectors)
    m, n = task_vectors[0].shape
    r = min(m, n)
    p = int(r * (1 / T))  # the authors' int(s.shape[0] * sv_reduction)
    zeros = dict(dtype=task_vectors[0].dtype, device=task_vectors[0].device)
    stack_u = torch.zeros(m, r, **zeros)
    stack_s = torch.zeros(r, **zeros)
    stack_v = torch.zeros(r, n, **zeros)
    for i, w in enumerate(task_vectors):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        keep = (s[:p] > rank_rtol * torch.linalg.norm(w)).to(s.dtype)
        stack_u[:, i * p:(i + 1) * p] = u[:, :p] * keep
        stack_s[i * p:(i + 1) * p] = s[:p] * keep
        stack_v[i * p:(i + 1) * p, :] = vh[:p, :] * keep[:, None]
    return polar(stack_u, rank_rtol) @ torch.diag(stack_s) @ polar(stack_v, rank_rtol)


def merged_delta(method: str, task_vectors: Sequence[torch.Tensor], common_space_fraction: float = 0.8,
                 rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """Merged task vector of one key: spectral for 2-D keys, the plain mean of the task vectors otherwise."""
    if task_vectors[0].dim() != 2:
        return sum(task_vectors) / len(task_vectors)
    if method == "iso_c":
        return iso_c(task_vectors, rank_rtol)
    if method == "iso_cts":
        return iso_cts(task_vectors, common_space_fraction, rank_rtol)
    if method == "tsv_m":
        return tsv_m(task_vectors, rank_rtol)
    raise ValueError(f"method must be one of {list(ISO_METHODS)}, got {method!r}")


def iso_merge_tensors(method: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], alpha: float = 1.0,
                      common_space_fraction: float = 0.8, compute_dtype: torch.dtype = torch.float64,
                      rank_rtol: float = RANK_RTOL) -> torch.Tensor:
    """``base + alpha * merged_delta`` in ``compute_dtype``, cast back to base's dtype (no validation)."""
    if not base.is_floating_point():
        return base.clone()
    b = base.to(compute_dtype)
    tvs = [t.to(compute_dtype) - b for t in tensors]
    return (b + alpha * merged_delta(method, tvs, common_space_fraction, rank_rtol)).to(base.dtype)


def iso_merge_state_dicts(method: str, base: Dict[str, torch.Tensor], finetuned: List[Dict[str, torch.Tensor]],
                          alpha: float = 1.0, common_space_fraction: float = 0.8,
                          compute_dtype: torch.dtype = torch.float64,
                          rank_rtol: float = RANK_RTOL) -> Dict[str, torch.Tensor]:
    """The authors' loop over keys: one :func:`iso_merge_tensors` per key."""
    return {k: iso_merge_tensors(method, v, [ft[k] for ft in finetuned], alpha, common_space_fraction,
                                 compute_dtype, rank_rtol) for k, v in base.items()}
