"""Model merging entry points: ``merge_tensors`` (one tensor) and ``merge_state_dicts`` (a model).

Routing only: the method registry (:mod:`wweight.methods`) says which family owns a method and
that family runs it - ``sparse`` (:mod:`wweight.sparse.merge`: linear and the task-arithmetic
methods, mergekit 0.1.5 semantics, one fused pass) or ``iso`` (:mod:`wweight.iso`: Iso-C,
Iso-CTS, TSV-M, batched spectral merges). Names, defaults and numbers follow mergekit 0.1.5.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from . import _validate
from . import methods as M
from .interp import interp_merge_state_dicts, interp_merge_tensors
from .iso import iso_merge_state_dicts, iso_merge_tensors
from .sparse import merge as ta
from .sparse.ops import key_seed

MERGE_METHODS = M.MERGE_METHODS
ISO_METHODS = M.ISO_METHODS
INTERP_METHODS = M.INTERP_METHODS

Num = Union[float, Sequence[float]]

__all__ = ["merge_tensors", "merge_state_dicts", "key_seed", "MERGE_METHODS", "ISO_METHODS", "INTERP_METHODS"]

_UNSET = object()  # density / gamma / epsilon not given (their meaning depends on the method)


def _method(name: str) -> M.MergeMethod:
    _validate.choice("method", name, MERGE_METHODS)
    return M.get(name)


def merge_tensors(method: str, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor],
                  weights: Optional[Num] = None, density: Num = _UNSET, gamma: Num = _UNSET,
                  epsilon: Num = _UNSET, lambda_: Optional[float] = None,
                  normalize: Optional[bool] = None, rescale: Optional[bool] = None,
                  seed: Optional[int] = None, *, backend: Optional[str] = None, **iso_kwargs) -> torch.Tensor:
    """Merge one tensor of K fine-tuned models (mergekit semantics; see :mod:`wweight.methods`).

    Args:
        method: one of :data:`MERGE_METHODS`.
        base: the base model's tensor (float32/float16/bfloat16/float64, any shape); optional for
            ``linear`` (mergekit's linear merge ignores it).
        tensors: K tensors of the fine-tuned models, same shape, dtype and device as ``base``.
        weights: per-model weight (scalar or K values; default 1.0 each). For TIES the sign
            election uses the weighted deltas and ``normalize`` divides by the summed weights of
            the agreeing models (0 replaced by 1), as mergekit.
        density, gamma, epsilon: sparsification parameters (scalar or one per model; defaults
            1.0, 0.01, 0.15), see :func:`wweight.sparsify`. ``epsilon`` is also RAM's threshold
            (``ram``, ``ramplus_tl``: default 1e-5).
        lambda_: mergekit's ``lambda`` (scales the merged delta; ``None`` = 1.0). ``lambda`` is a
            Python keyword, so the mergekit spelling is accepted as ``**{"lambda": 0.5}`` (YAML
            parameter dicts pass through unchanged); giving both is an error.
        normalize, rescale: ``None`` = the method's mergekit default; rescale is mergekit's
            L1-norm rescale of each sparsified delta.
        seed: Philox key of DARE/DELLA masks (model i uses stream i); ``None`` draws one from
            torch's generator.
        iso_kwargs: for ``iso_c``/``iso_cts``/``tsv_m`` (``alpha``, ``common_space_fraction``,
            ``compute_dtype``), forwarded to :func:`wweight.iso.iso_merge_tensors`. Any method
            also takes ``int8_mask`` (a bool, as in mergekit's YAML): mergekit's ``int8_mask``
            only stores its masks as int8 to save memory, which changes no number, and wweight
            builds no mask tensors, so it is accepted and has no effect. For mergekit's other
            methods (``slerp``, ``nuslerp``, ``multislerp``, ``karcher``, ``model_stock``, ``sce``,
            ``ram``, ``ramplus_tl``, ``nearswap``, ``arcee_fusion``, ``passthrough``; the ``interp``
            family, :mod:`wweight.interp`) their parameters by mergekit's names: ``t``,
            ``nuslerp_flatten``, ``nuslerp_row_wise``, ``normalize_weights``, ``eps``, ``max_iter``,
            ``tol``, ``filter_wise``, ``select_topk``, ``r``, ``alpha``, ``scale`` (per model);
            ``weights`` is nuslerp's / multislerp's per-model ``weight``.

    ``base=None`` with a task-vector method (everything but ``linear``): ``tensors`` are then
    task vectors (deltas), as in PEFT's ``ties`` / ``dare_linear`` utilities - the base is taken
    as zeros and the result is the merged delta. The isotropic methods need the base itself
    (their result is ``base + alpha * merged_delta``; pass zeros for deltas).

    Returns:
        A new tensor with ``base``'s shape, dtype and device (for ``linear``: ``tensors[0]``'s).
        Inputs are never modified. NaN/Inf in any input raise ``ValueError`` naming it.
    """
    m = _method(method)
    lambda_ = _lambda_arg(lambda_, iso_kwargs)
    _validate.boolean("int8_mask", iso_kwargs.pop("int8_mask", False))  # no numeric effect (see above)
    if m.family == "interp":
        given = {"density": density, "gamma": gamma}
        if "epsilon" in m.names():
            iso_kwargs["epsilon"] = None if epsilon is _UNSET else epsilon
        else:
            given["epsilon"] = epsilon
        bad = [k for k, v in given.items() if v is not _UNSET] + \
              [k for k, v in (("lambda", lambda_), ("normalize", normalize), ("rescale", rescale)) if v is not None]
        if bad:
            raise TypeError(f"{', '.join(bad)} {'is not a parameter' if len(bad) == 1 else 'are not parameters'} "
                            f"of {method} (its parameters: {', '.join(m.names()) or 'none'})")
        return interp_merge_tensors(method, base, tensors, weights, backend=backend, seed=seed, **iso_kwargs)
    density = M.DENSITY.default if density is _UNSET else density
    gamma = M.GAMMA.default if gamma is _UNSET else gamma
    epsilon = M.EPSILON.default if epsilon is _UNSET else epsilon
    if m.family == "iso":
        if lambda_ is not None:
            raise TypeError(f"lambda is not a parameter of {method}; scale with alpha")
        if weights is not None:  # as merge_state_dicts: silently ignoring them would hide a mistake
            raise ValueError(f"weights are not used by {method}; scale with alpha")
        return iso_merge_tensors(method, base, list(tensors), backend=backend, **iso_kwargs)
    if iso_kwargs:
        raise TypeError(f"unexpected keyword arguments for method {method!r}: {sorted(iso_kwargs)}")
    if base is None and m.needs_base and isinstance(tensors, (list, tuple)) and tensors \
            and isinstance(tensors[0], torch.Tensor):
        base = torch.zeros_like(tensors[0])  # PEFT habit: the tensors are task vectors
    return ta.merge_tensors(m, base, tensors, weights, density, gamma, epsilon,
                            M.LAMBDA.default if lambda_ is None else lambda_, normalize, rescale, seed, backend)


def _lambda_arg(lambda_, kwargs: dict):
    """``lambda_`` or mergekit's ``lambda`` (popped from ``kwargs``); both given is an error."""
    if "lambda" in kwargs:
        if lambda_ is not None:
            raise TypeError("give lambda_ or lambda (mergekit's name), not both")
        lambda_ = kwargs.pop("lambda")
    return lambda_


def merge_state_dicts(method: str, base: Optional[Dict[str, torch.Tensor]], finetuned: Sequence[Dict[str, torch.Tensor]],
                      weights: Optional[Num] = None, alpha: Optional[float] = None, *, backend: Optional[str] = None,
                      progress: bool = False, **kwargs) -> Dict[str, torch.Tensor]:
    """Merge whole models: ``base`` and each of ``finetuned`` map names to tensors (same keys/shapes).

    Task-arithmetic methods run :func:`merge_tensors` key by key (``alpha`` is mergekit's
    ``lambda``; other keyword arguments: ``density``, ``gamma``, ``epsilon``, ``normalize``,
    ``rescale``, ``seed``). With one ``seed``, each key gets its own Philox key derived from the
    seed and the key's name (:func:`key_seed`), so a model merge is reproducible and equals
    ``wweight merge`` with the same seed. Isotropic methods
    (``iso_c``, ``iso_cts``, ``tsv_m``) batch SVDs across all keys of the same shape
    (:func:`wweight.iso.iso_merge_state_dicts`). Non-float tensors (e.g. integer buffers) are
    copied from ``base``. mergekit's other methods (the ``interp`` family) run key by key with their
    own parameters in ``kwargs`` (``alpha`` is then ramplus_tl's; default: the registry's).
    Returns a new dict with ``base``'s keys, dtypes and devices.
    """
    m = _method(method)
    _validate.boolean("int8_mask", kwargs.pop("int8_mask", False))  # no numeric effect (merge_tensors)
    if isinstance(finetuned, dict) or not isinstance(finetuned, (list, tuple)):
        raise TypeError("finetuned must be a list of state dicts")
    if len(finetuned) == 0:
        raise ValueError("finetuned is empty: give at least one fine-tuned model")
    if m.family == "interp":
        if alpha is not None:
            kwargs["alpha"] = alpha
        return interp_merge_state_dicts(method, base, list(finetuned), weights, backend=backend, progress=progress,
                                        **kwargs)
    alpha = 1.0 if alpha is None else alpha
    if m.family == "iso":
        if weights is not None:
            raise ValueError(f"weights are not used by {method}; scale with alpha")
        return iso_merge_state_dicts(method, base, list(finetuned), alpha=alpha, backend=backend, progress=progress,
                                     **kwargs)
    return ta.merge_state_dicts(m, base, finetuned, weights, alpha, backend, progress, **kwargs)
