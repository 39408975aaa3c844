"""Which elements of a weight are held out of the quantization and stored exactly.

An outlier spec (the ``outliers`` argument of :func:`wweight.quantize`) becomes a float32
threshold and an optional boolean mask: an element is an outlier iff ``|w| >= threshold`` or
``mask[i]``. Fractions use the sparse family's exact radix select
(:func:`wweight.kth_largest_abs`); z-scores follow the Super Weight paper's code
(``|w| > mean|w| + z std|w|``); coordinates name elements (published super weights).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _validate
from ..sparse import kth_largest_abs

_SPEC_KEYS = ("fraction", "zscore", "coords")


def _coords_mask(w: torch.Tensor, coords) -> torch.Tensor:
    if not isinstance(coords, torch.Tensor):
        try:
            coords = torch.as_tensor(coords, dtype=torch.int64)
        except Exception:
            raise TypeError("outliers coordinates must be an (N, ndim) integer tensor") from None
    if coords.dtype.is_floating_point or coords.dtype == torch.bool or coords.is_complex():
        raise TypeError(f"outliers coordinates must be an integer tensor, got {coords.dtype}")
    nd = max(w.dim(), 1)
    if coords.dim() == 1 and coords.numel() == nd:
        coords = coords.view(1, nd)
    if coords.dim() != 2 or coords.shape[1] != nd:
        raise ValueError(f"outliers coordinates must have shape (N, {nd}) for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(coords.shape)}")
    c = coords.to(device="cpu", dtype=torch.int64)
    dims = torch.tensor(list(w.shape) if w.dim() else [1], dtype=torch.int64)
    bad = (c < 0) | (c >= dims)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"outliers coordinates out of range: {c[row].tolist()} for a weight of shape {tuple(w.shape)}")
    strides = torch.tensor(_contig_strides(dims.tolist()), dtype=torch.int64)
    flat = (c * strides).sum(1)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[flat] = True
    return mask.to(w.device)


def _contig_strides(shape: Sequence[int]) -> List[int]:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return st[::-1]


def _fraction_thr(w: torch.Tensor, f) -> float:
    f = _validate.number("outliers (fraction)", f, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    k = max(1, int(f * w.numel()))
    return float(kth_largest_abs(w, k))


def _zscore_thr(w: torch.Tensor, z) -> float:
    z = _validate.number("outliers (zscore)", z, lo=0.0, lo_open=True)
    a = w.float().abs()
    t = (a.mean() + z * a.std()).to(torch.float32)
    # the paper code's rule is '|w| > t'; kernels test '|w| >= thr': thr = next float32 above t
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=torch.float32, device=t.device)))


def outlier_plan(w: torch.Tensor, outliers) -> Tuple[float, Optional[torch.Tensor]]:
    """-> (threshold, mask): an element is an outlier iff float32 |w| >= threshold or mask[i]."""
    if outliers is None:
        return math.inf, None
    if isinstance(outliers, (list, dict)):
        if isinstance(outliers, dict):
            bad = [k for k in outliers if k not in _SPEC_KEYS]
            if bad:
                raise ValueError(f"outliers dict keys must be among {list(_SPEC_KEYS)}, got {bad}")
            items = []
            for k, v in outliers.items():
                if k == "fraction":
                    items.append((_fraction_thr(w, v), None))
                elif k == "zscore":
                    items.append((_zscore_thr(w, v), None))
                else:
                    items.append((math.inf, _coords_mask(w, v)))
        else:
            items = [outlier_plan(w, o) for o in outliers]
        thr, mask = math.inf, None
        for t, m in items:
            thr = min(thr, t)
            if m is not None:
                mask = m if mask is None else (mask | m)
        return thr, mask
    if isinstance(outliers, torch.Tensor):
        if outliers.dtype.is_floating_point and outliers.numel() == 1:
            return _fraction_thr(w, outliers), None
        return math.inf, _coords_mask(w, outliers)
    if isinstance(outliers, bool) or not isinstance(outliers, (int, float)):
        raise TypeError("outliers must be None, a fraction in (0, 1), {'zscore': z}, an (N, ndim) integer "
                        f"tensor of coordinates, {{'coords': ...}}, or a list of these; got {type(outliers).__name__}")
    return _fraction_thr(w, outliers), None


def native_threshold(thr: float, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value t of ``dtype`` with t >= ``thr`` (a float32 number >= 0), as a 0-d tensor.

    For x of ``dtype``, float32 ``|x| >= thr`` iff ``|x| >= t`` (float32(x) is exact), so the
    outlier test runs on x itself instead of a float32 copy (which read 2 and wrote 4 bytes per
    element of a 16-bit weight before the test even started)."""
    thr = max(float(thr), 0.0)                             # |x| >= thr < 0 holds exactly as |x| >= 0
    t = torch.tensor(thr, dtype=torch.float32).to(dtype)   # round to nearest (inf past the range)
    if float(t) < thr:                                     # rounded down: step to the next value up
        bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16}.get(dtype)
        t = (t.view(bits) + 1).view(dtype) if bits is not None else torch.nextafter(t, t.new_tensor(math.inf))
    return t


def outlier_indices(x, thr, mask) -> torch.Tensor:
    """Sorted flat indices of float32 ``|x| >= thr`` or ``mask`` (int64): abs, compare and nonzero on
    x's own dtype (one pass fewer for 16-bit weights, and half the bytes in the other two)."""
    if not math.isfinite(thr) and mask is None:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    if math.isfinite(thr):
        if x.dtype in (torch.float16, torch.bfloat16):
            m = x.abs() >= native_threshold(thr, x.dtype)   # a 0-d CPU tensor: no host->device copy
        else:  # float32: x.float() is x itself; float64 must round to float32 first, as the reference
            m = x.float().abs() >= thr
        if mask is not None:
            m |= mask
    else:
        m = mask
    return torch.nonzero(m).view(-1)


