"""Plain-torch references of mergekit 0.1.5's remaining merge methods, line by line.

Each function is a transcription of ``mergekit/merge_methods/<method>.py`` (mergekit 0.1.5) on
plain tensors instead of mergekit's ``TensorGroup`` / ``TensorBatch``: the same torch ops in the
same order and the same dtypes (mergekit computes most of these methods in the inputs' dtype,
bf16 included; ``slerp`` and ``karcher``'s norms in float32, float64 for float64 inputs), so the
numbers are mergekit's. ``base`` is the base model's tensor (``None`` where the method allows
it), ``tensors`` the other models' tensors in input order; all of one shape and dtype.

Where mergekit is not a pure function of its inputs the reference says so: ``arcee_fusion``
samples 1M elements with ``torch.randint`` above 1M elements (here: the exact quantiles of all
elements, i.e. mergekit with the sample size raised past the tensor), ``sce``'s ``torch.topk``
picks an unspecified subset of the elements tied at its cut (here as mergekit: ``torch.topk``).
Every function returns a new tensor in the inputs' dtype (mergekit's karcher returns float32
for 0-d 16-bit inputs, by type promotion of 0-d tensors; the value is cast back here).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1024 * 1024  # mergekit slerp.py: full-precision scratch per chunk


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """mergekit ``slerp.slerp`` on one logical tensor (its batch axis of 1 added here).

    ``v0`` is the base (t = 0), ``v1`` the other model. mergekit packs ``t`` as a float32 tensor
    (float64 for float64 inputs) and works in that dtype; the result is stored in the input dtype.
    """
    shape = v0.shape
    dtype = _compute(v0.dtype)
    v0, v1 = v0.unsqueeze(0), v1.unsqueeze(0)
    t = torch.tensor([t], dtype=dtype, device=v0.device)
    a = v0.reshape(v0.shape[0], -1)
    b = v1.reshape(v1.shape[0], -1)
    t = t.reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(shape).to(v0.dtype)
    chunk_size = max(1, _CHUNK_ELEMENTS // a.shape[0])
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], chunk_size):
        x = a[:, start:start + chunk_size].to(dtype)
        y = b[:, start:start + chunk_size].to(dtype)
        norm_a_parts.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], chunk_size):
        x = a[:, start:start + chunk_size].to(dtype) / norm_a
        y = b[:, start:start + chunk_size].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for start in range(0, a.shape[1], chunk_size):
        x = a[:, start:start + chunk_size].to(dtype)
        y = b[:, start:start + chunk_size].to(dtype)
        result[:, start:start + chunk_size] = coef_a * x + coef_b * y
    return result.reshape(shape)


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
             flatten: bool = False) -> torch.Tensor:
    out_shape = v0.shape

    def _normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif dim != -1:
        v0 = v0.transpose(dim, -1)
        v1 = v1.transpose(dim, -1)
    v0_u = _normalize(v0)
    v1_u = _normalize(v1)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def nuslerp(base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], weights: Sequence[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> torch.Tensor:
    """mergekit ``nuslerp_merge_method``: exactly two non-base tensors, optional base."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is not None:
        return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=nuslerp_flatten)
    return _nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=nuslerp_flatten)


def multislerp(base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], weights: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit ``multislerp``: barycentric interpolation on the hypersphere (optional base)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    tensors = torch.stack(list(tensors), dim=0)
    if base is not None:
        tensors -= base
    tensors_flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(list(weights), dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(tensors_flat, dim=-1, keepdim=True)
    unit_tensors = tensors_flat / (norms + eps)
    mean = (unit_tensors * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
            if base is not None:
                res = res + base
            return res
        raise ValueError("multislerp: the weighted sum of the input tensors is zero (antipodal vectors or sets "
                         "of vectors whose weights exactly balance out, e.g. a, -a with equal weights); "
                         "use different weights")
    mean = mean / mean_norm
    dots = (unit_tensors * mean).sum(-1, keepdim=True)
    tangent_vectors = unit_tensors - dots * mean
    tangent_result = (tangent_vectors * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)
    avg_norm = (norms.squeeze(-1) * weights).sum()
    result = result * avg_norm
    result = result.view(tensors.shape[1:])
    if base is not None:
        result = result + base
    return result


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit ``karcher_merge_method`` (equal weights 1/K): Karcher mean on the unit sphere."""
    out_dtype = tensors[0].dtype
    if len(tensors) == 1:
        return tensors[0].clone()
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = _compute(tensors[0].dtype)
    norms: List[torch.Tensor] = []
    units: List[torch.Tensor] = []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        if norm.item() == 0.0:
            units.append(torch.zeros_like(tensor))
        else:
            units.append((tensor / norm).to(tensor.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors).to(out_dtype)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    normalized = [a / alpha_sum for a in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(normalized, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(normalized, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return (scale * mean).to(out_dtype)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """mergekit ``model_stock_merge_method`` (Jang et al. 2024): t = K cos / (1 + (K-1) cos)."""
    w_0, ws = base, list(tensors)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for idx, offset_a in enumerate(offsets):
        for offset_b in offsets[idx + 1:]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def _sign_consensus(delta: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit ``generalized_task_arithmetic.get_mask(method="sum")``."""
    sign = delta.sign().to(mask_dtype)
    sign_weight = delta.sum(dim=0)
    majority_sign = (sign_weight >= 0).to(mask_dtype) * 2 - 1
    return sign == majority_sign


def sce_mask(tvs: torch.Tensor, density: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit ``sce.sce_mask``: keep the ``int(nonzero * density)`` largest variances (torch.topk)."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var)
    k = int(nonzero * density)
    if k == 0:
        return torch.zeros_like(var, dtype=mask_dtype)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    mask.view(-1)[indices] = 1
    return mask


def sce_weight(tvs: torch.Tensor) -> torch.Tensor:
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    weight_sum = torch.sum(weights).item()
    if abs(weight_sum) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / weight_sum


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit ``sce_merge`` (Wan et al. 2024, FuseChat): variance top-k, TIES sign pass, energy weights."""
    if not tensors:
        return base.clone()
    mask_dtype = base.dtype  # int8_mask only changes the mask's storage (0/1 either way)
    task_vectors = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        mask = sce_mask(task_vectors, select_topk, mask_dtype)
        task_vectors = task_vectors * mask.unsqueeze(0)
    erase_mask = _sign_consensus(task_vectors, mask_dtype)
    tv_weights = sce_weight(task_vectors)
    while tv_weights.dim() < task_vectors.dim():
        tv_weights = tv_weights.unsqueeze(-1)
    erased_weights = tv_weights * erase_mask
    merged_tv = (task_vectors * erased_weights).sum(dim=0)
    final_tv = merged_tv / torch.sum(erased_weights, dim=0).clamp(min=1e-6)
    return base + final_tv


def _prepare_ram(tensors, base, epsilon):
    task_vectors = torch.stack([t - base for t in tensors], dim=0)
    tv_flat = task_vectors.view(len(tensors), -1)
    nonzero_mask = tv_flat.abs() > epsilon
    contrib_counts = nonzero_mask.sum(dim=0, keepdim=True)
    return tv_flat, nonzero_mask, contrib_counts, contrib_counts > 1, contrib_counts == 1


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit ``ram_merge``: unique task-vector entries kept, overlapping ones averaged."""
    if not tensors:
        return base.clone()
    tv_flat, nonzero, counts, overlap, unique = _prepare_ram(tensors, base, epsilon)
    tv_flat_z = tv_flat * nonzero
    merged = ((tv_flat_z * unique) + (tv_flat_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit ``ramplus_tl_merge``: RAM with unique entries scaled by 1 + r * clamp(rho, 0, alpha)."""
    if not tensors:
        return base.clone()
    tv_flat, nonzero, counts, overlap, unique = _prepare_ram(tensors, base, epsilon)
    shared_counts = (nonzero & overlap).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    lambda_ = 1 + r * rho.clamp(min=0, max=alpha)
    tv_flat_z = tv_flat * nonzero
    merged = ((tv_flat_z * unique * lambda_.unsqueeze(-1))
              + (tv_flat_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    # lambda_ is float32 (int counts / float clamp): mergekit's result is float32 for 16-bit inputs
    return (base + merged.reshape_as(base)).to(base.dtype)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit ``nearswap_merge``: take ``other`` where it is within ``t`` of the base, blend beyond."""
    absdiff = torch.abs(base - other)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _approximate_quantiles(tensor: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # mergekit samples 1M elements with torch.randint above 1M; the reference takes all of them
    sorted_tensor, _ = torch.sort(tensor.reshape(-1))
    return sorted_tensor[(q.to(sorted_tensor.device) * (sorted_tensor.numel() - 1)).long()]


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit ``arcee_fusion_merge_method``: keep the task-vector entries whose importance
    ``|delta| * KL(softmax(other) || softmax(base))`` (KL over the last dim) reaches
    median + 1.5 IQR."""
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl_div = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = diff * kl_div
    q1, median, q3 = _approximate_quantiles(importance, torch.tensor([0.25, 0.5, 0.75]))
    threshold = median + 1.5 * (q3 - q1)
    fusion_mask = (importance >= threshold).float()
    # the float32 mask promotes mergekit's result to float32 for 16-bit inputs; cast back
    return (base + (other - base) * fusion_mask).to(base.dtype)


def passthrough(tensor: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """mergekit ``passthrough_merge_method`` for one whole tensor."""
    return tensor.clone() if scale is None else tensor * scale
