"""wweight's Iso-C, Iso-CTS, TSV-M and TIES as FusionBench algorithms (FusionBench >= 0.2.33).

Each class subclasses the FusionBench algorithm it replaces and keeps its constructor, so a
FusionBench config switches by its ``_target_`` alone::

    # fusion_bench_config/method/...yaml
    _target_: wweight.integrations.fusion_bench.IsoCMerge      # was fusion_bench.method.ISO_C_Merge
    scaling_factor: 1.0

    from wweight.integrations.fusion_bench import TiesMerging
    model = TiesMerging(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum").run(modelpool)

=====================  =======================================================  =========================
wweight class          replaces (FusionBench)                                   runs on
=====================  =======================================================  =========================
``IsoCMerge``          ``IsotropicMergingInCommonSubspace`` (``ISO_C_Merge``)    ``merge_state_dicts("iso_c")``
``IsoCTSMerge``        ``IsotropicMergingInCommonAndTaskSubspace``              ``merge_state_dicts("iso_cts")``
``TSVMerge``           ``task_singular_vector.TaskSingularVectorMerging``       ``merge_state_dicts("tsv_m")``
``TiesMerging``        ``TiesMergingAlgorithm``                                 ``kth_largest_abs`` + per-key pass
=====================  =======================================================  =========================

Semantics are FusionBench's, not mergekit's, where the two differ:

* **TIES** is FusionBench's (from the TIES authors' code): one magnitude threshold per task over the
  *whole model* (all keys, flattened; not per tensor as in mergekit), ``threshold`` a fraction or a
  percentage (> 1), keeping ``|tau| >= kthvalue(d - int(d*K))`` -- ``int(d*K) + 1`` elements per task
  without ties where mergekit keeps ``int(d*K)``; the elected sign ``sign(sum_t tau_t)`` with zeros set
  to the model-wide majority sign; ``merge_func`` sum / mean / max. The threshold is wweight's exact
  radix select (``kth_largest_abs``) on one task's flat vector at a time; the masking, election and
  disjoint merge run key by key (FusionBench stacks all K flattened models: K + 3 model-sized copies).
  Same bits as FusionBench (tested), except that the majority sign is an exact integer count where
  FusionBench sums the signs in float32 (they differ only if that sum is within rounding of zero).
* **Iso-C / Iso-CTS / TSV-M**: the spectral keys (2-D, not in ``exclude_keys``) run on wweight's
  eigendecomposition path (error vs float64 ~2e-7 relative where FusionBench's float32 SVD gives up to
  ~1e-4: the numbers agree to that tolerance, not bit for bit); every other key is FusionBench's mean of
  the task vectors with FusionBench's own arithmetic (Iso-C: ``sum(tvs) / T``; Iso-CTS and TSV-M: the
  running mean), so those keys are bit-identical. TSV-M with a list ``alpha`` scales each task vector
  first, as FusionBench does.

What is not covered runs FusionBench's own ``run`` (never different numbers silently): TIES with
``remove_keys``, non-floating or mixed-dtype state dicts; TSV-M with ``return_single_task_models``.
Like FusionBench, ``run`` loads the merged weights into the pool's pretrained model and returns it.

FusionBench is imported by this module (it is optional for wweight: ``pip install fusion-bench``);
importing :mod:`wweight` never imports it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Dict, List

import torch

try:
    from fusion_bench.method import (
        IsotropicMergingInCommonAndTaskSubspace as _FBIsoCTS,
        IsotropicMergingInCommonSubspace as _FBIsoC,
        TiesMergingAlgorithm as _FBTies,
    )
    from fusion_bench.method.task_singular_vector import TaskSingularVectorMerging as _FBTSVM
except ImportError as e:  # pragma: no cover - exercised only without fusion-bench
    raise ImportError("wweight.integrations.fusion_bench needs FusionBench: pip install fusion-bench") from e

__all__ = ["IsoCMerge", "IsoCTSMerge", "TSVMerge", "TiesMerging"]


def _pool(modelpool):
    from fusion_bench.compat.modelpool import to_modelpool

    return to_modelpool(modelpool)


def _device(alg):
    """FusionBench's accelerator for the iso methods (its Lightning Fabric), CPU when there is none."""
    try:
        return alg.fabric.device
    except Exception:  # pragma: no cover - no Fabric available
        return torch.device("cpu")


def _load(modelpool):
    pre = modelpool.load_pretrained_model()
    fts = [modelpool.load_model(n).state_dict() for n in modelpool.model_names]
    return pre, pre.state_dict(), fts


def _check_keys(base: Dict[str, torch.Tensor], fts: List[Dict[str, torch.Tensor]]) -> None:
    names = set(base)
    for i, sd in enumerate(fts):
        if set(sd) != names:
            raise ValueError(f"finetuned model {i} has different parameter names than the pretrained model: "
                             f"{sorted(names.symmetric_difference(sd))[:5]}")


def _mean_tv(tvs: List[torch.Tensor], running: bool) -> torch.Tensor:
    """FusionBench's mean of one key's task vectors, with its arithmetic (so the same bits)."""
    if not running:                                   # iso_c: sum(tvs) / num_tvs
        return sum(tvs) / len(tvs)
    out = tvs[0].clone()                              # iso_cts / TSVM: the running mean
    for i, v in enumerate(tvs[1:], start=1):
        out += (v - out) / (i + 1)
    return out


def _iso_run(alg, modelpool, method: str, exclude_keys, scaling, running_mean: bool, task_scales=None, **kw):
    """``base + scaling * merged`` (FusionBench's ``state_dict_add(pre, state_dict_mul(tv, scaling))``;
    ``scaling=None``: no product, as TSV-M without alpha); ``task_scales`` scale each task vector first."""
    from .. import merge_state_dicts

    pre, base, fts = _load(_pool(modelpool))
    _check_keys(base, fts)
    exclude = set(exclude_keys or [])

    def tvs(k):
        out = [sd[k] - base[k] for sd in fts]
        return out if task_scales is None else [a * t for a, t in zip(task_scales, out)]

    spectral = [k for k, v in base.items() if v.dim() == 2 and k not in exclude and v.is_floating_point()]
    merged: Dict[str, torch.Tensor] = {}
    if spectral:
        sub = [{k: sd[k] for k in spectral} for sd in fts]
        if task_scales is not None:   # wweight forms the task vectors itself: hand it the scaled models
            sub = [{k: base[k] + t for k, t in zip(spectral, ts)} for ts in zip(*[tvs(k) for k in spectral])]
        merged = merge_state_dicts(method, {k: base[k] for k in spectral}, sub,
                                   alpha=1.0 if scaling is None else float(scaling), device=_device(alg), **kw)
    out = {}
    for k, b in base.items():
        if k in merged:
            out[k] = merged[k]
        elif b.is_floating_point():
            tv = _mean_tv(tvs(k), running_mean)
            out[k] = b + tv if scaling is None else b + _mul(scaling, tv)
        else:
            out[k] = b.clone()
    pre.load_state_dict(out)
    return pre


def _mul(scalar, t: torch.Tensor) -> torch.Tensor:
    """FusionBench's ``state_dict_mul`` for one tensor (a zero scalar or tensor keeps the tensor)."""
    return t.clone() if scalar == 0 or bool(torch.all(t == 0)) else scalar * t


class IsoCMerge(_FBIsoC):
    """Iso-C (Marczak et al., "No Task Left Behind", ICML 2025) on wweight; FusionBench's ``ISO_C_Merge``
    interface (``scaling_factor``, ``exclude_keys``)."""

    @torch.no_grad()
    def run(self, modelpool):
        return _iso_run(self, modelpool, "iso_c", self.exclude_keys, self.scaling_factor, running_mean=False)


class IsoCTSMerge(_FBIsoCTS):
    """Iso-CTS on wweight; FusionBench's ``ISO_CTS_Merge`` interface (``scaling_factor``,
    ``common_space_fraction``, ``exclude_keys``)."""

    @torch.no_grad()
    def run(self, modelpool):
        return _iso_run(self, modelpool, "iso_cts", self.exclude_keys, self.scaling_factor, running_mean=True,
                        common_space_fraction=float(self.common_space_fraction))


class TSVMerge(_FBTSVM):
    """TSV-M (Gargiulo et al., "Task Singular Vectors", CVPR 2025) on wweight; FusionBench's
    ``TaskSingularVectorMerging`` interface (``alpha``: None, a number or one per task; ``exclude_keys``)."""

    @torch.no_grad()
    def run(self, modelpool):
        if self.return_single_task_models:
            return super().run(modelpool)
        a = self.alpha
        if a is not None and isinstance(a, Iterable) and not isinstance(a, (str, bytes)):
            a = [float(x) for x in a]
            n = len(_pool(modelpool).model_names)
            if len(a) != n:
                raise ValueError(f"alpha has {len(a)} values, expected one per model ({n})")
            return _iso_run(self, modelpool, "tsv_m", self.exclude_keys, None, running_mean=True, task_scales=a)
        return _iso_run(self, modelpool, "tsv_m", self.exclude_keys, None if a is None else float(a),
                        running_mean=True)


def _keep_count(d: int, threshold: float) -> int:
    """Elements FusionBench's ``topk_values_mask`` keeps without ties: the (d - int(d*K))-th smallest
    |tau| and everything above it, i.e. the ``int(d*K) + 1`` largest."""
    K = threshold / 100 if threshold > 1 else threshold
    k_small = d - int(d * K)
    if not 1 <= k_small <= d:
        raise ValueError(f"threshold {threshold!r} keeps every element (FusionBench's kthvalue(0) fails); "
                         "use a threshold below 1 (a fraction) or below 100 (a percentage)")
    return d - k_small + 1


class TiesMerging(_FBTies):
    """TIES (Yadav et al., NeurIPS 2023) with FusionBench's semantics (model-wide thresholds; see the
    module docstring) on wweight's exact select; FusionBench's ``TiesMergingAlgorithm`` interface."""

    @torch.no_grad()
    def run(self, modelpool, **kwargs):
        from .. import kth_largest_abs

        pool = _pool(modelpool)
        remove = self.config.get("remove_keys", []) or []
        merge_func = str(self.config.get("merge_func", "sum")).split("-")[-1]
        if merge_func not in ("sum", "mean", "max"):
            raise ValueError(f"merge_func must be 'sum', 'mean' or 'max', got {merge_func!r}")
        pre = pool.load_model("_pretrained_")
        if not isinstance(pre, torch.nn.Module):
            return super().run(modelpool, **kwargs)
        base = pre.state_dict()
        dts = {v.dtype for v in base.values()}
        if remove or len(dts) != 1 or not next(iter(dts)).is_floating_point:
            return super().run(modelpool, **kwargs)
        fts = [pool.load_model(n).state_dict() for n in pool.model_names]
        _check_keys(base, fts)
        keys = sorted(base)
        d = sum(base[k].numel() for k in keys)
        keep = _keep_count(d, float(self.threshold))
        # one model-wide threshold per task: exact radix select over one task's flat vector at a time
        kth = []
        for sd in fts:
            flat = torch.cat([(sd[k] - base[k]).reshape(-1) for k in keys])
            kth.append(kth_largest_abs(flat, keep))
            del flat
        # the masked task vectors' elected signs, and the model-wide majority sign for the zero ones
        pos = neg = 0
        for k in keys:
            s = self._signs(k, base, fts, kth)
            pos += int((s > 0).sum())
            neg += int((s < 0).sum())
        majority = torch.tensor(float((pos > neg) - (pos < neg)), dtype=base[keys[0]].dtype)
        out = {}
        for k in keys:
            v = self._masked(k, base, fts, kth)
            sign = torch.sign(v.sum(dim=0))
            sign[sign == 0] = majority
            keep_mask = torch.where(sign.unsqueeze(0) > 0, v > 0, v < 0)
            sel = v * keep_mask
            if merge_func == "mean":
                cnt = (sel != 0).sum(dim=0).float()
                agg = torch.sum(sel, dim=0) / torch.clamp(cnt, min=1)
            elif merge_func == "sum":
                agg = torch.sum(sel, dim=0)
            else:
                agg = sel.abs().max(dim=0)[0]
                agg *= sign
            out[k] = (base[k].reshape(-1) + self.scaling_factor * agg).reshape(base[k].shape)
        pre.load_state_dict(out)
        return pre

    @staticmethod
    def _masked(k, base, fts, kth) -> torch.Tensor:
        """(K, n) masked task vectors of key ``k``: FusionBench's ``M * (|M| >= kth)`` per task."""
        tv = torch.stack([(sd[k] - base[k]).reshape(-1) for sd in fts])
        th = torch.stack(kth).reshape(-1, 1)
        return tv * (tv.abs() >= th)

    @classmethod
    def _signs(cls, k, base, fts, kth) -> torch.Tensor:
        return torch.sign(cls._masked(k, base, fts, kth).sum(dim=0))
