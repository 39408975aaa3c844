"""scipy's input contract for :func:`wweight.linear_sum_assignment`: conversion, refusals, results.

``scipy.optimize.linear_sum_assignment(cost_matrix, maximize=False)`` (scipy 1.17,
``scipy/optimize/_lsapmodule.c`` and ``rectangular_lsap/rectangular_lsap.cpp``) does, in order:

1. ``maximize`` through ``PyArg_ParseTupleAndKeywords(..., "O|p")``: any object, ``bool(maximize)``
   (an object whose truth value raises makes the call raise that, before the cost is looked at);
2. ``PyArray_ContiguousFromAny(cost_matrix, NPY_DOUBLE, 0, 0)``: an array (or anything with
   ``__array__`` / the buffer protocol) is cast to float64 under numpy's *safe* rule (complex, object,
   float128, str, datetime arrays: ``TypeError("Cannot cast array data from dtype(...) ...")``); any
   other object (nested lists, tuples, scalars, strings) is converted element by element as
   ``np.array(x, dtype=float64)`` does (``["1", "2"]`` is accepted, ``"x"`` raises
   ``ValueError("could not convert string to float: 'x'")``, ragged lists numpy's ValueError);
3. ``ValueError("expected a matrix (2-D array), got a %d array")`` unless 2-D;
4. empty (a zero dimension): empty int64 results;
5. transposes a tall matrix, negates the costs when maximising, then refuses NaN and ``-inf`` *of the
   negated matrix* with ``ValueError("matrix contains invalid numeric entries")``: minimising, ``-inf``
   is invalid and ``+inf`` marks a forbidden pair; maximising, ``+inf`` is invalid and ``-inf`` is the
   forbidden pair;
6. ``ValueError("cost matrix is infeasible")`` when no assignment of finite total exists.

wweight follows every step with the same exception types and messages, plus: torch tensors of any
real or bool dtype (bf16 included) on any device (results are torch int64 on that device; scipy
would refuse CUDA / bf16 / requires-grad tensors), complex tensors like numpy arrays converted by
scipy via ``__array__`` (real part, ``ComplexWarning``), and a 3-D batch ``(B, n, m)`` of independent
problems (errors name the batch index).
"""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
import torch

try:  # numpy >= 1.25
    from numpy.exceptions import ComplexWarning as _ComplexWarning
except ImportError:  # pragma: no cover - older numpy
    _ComplexWarning = np.ComplexWarning

INVALID = "matrix contains invalid numeric entries"
INFEASIBLE = "cost matrix is infeasible"


def _array_like(x) -> bool:
    """Objects numpy converts as arrays (then casts with the safe rule), not element by element."""
    if isinstance(x, (np.ndarray, memoryview)):
        return True
    if isinstance(x, (str, bytes)):
        return False
    return any(hasattr(x, a) for a in ("__array__", "__array_interface__", "__array_struct__"))


def as_cost(cost_matrix) -> Tuple[torch.Tensor, bool]:
    """The cost as a float64 tensor on its device (maybe the input's own storage: never write to it).

    Returns ``(tensor, torch_in)``: ``torch_in`` says the results are torch tensors (else numpy).
    Raises what ``scipy.optimize.linear_sum_assignment`` raises for the same object (steps 2-3 above).
    """
    if isinstance(cost_matrix, torch.Tensor):
        t = cost_matrix.detach()
        if t.device.type == "meta":
            raise ValueError("cost_matrix is a meta tensor (no values): linear_sum_assignment needs real costs")
        if t.is_complex():
            # what scipy does with a complex CPU tensor (numpy's __array__ cast): keep the real part
            warnings.warn("Casting complex values to real discards the imaginary part", _ComplexWarning, stacklevel=3)
            t = t.real
        t = t.to(torch.float64)  # bool / integer / 16-bit floats: exact in float64 (int64 > 2^53 rounds, as numpy)
        torch_in = True
    else:
        if _array_like(cost_matrix):
            arr = np.asarray(cost_matrix).astype(np.float64, casting="safe", copy=False)
        else:
            arr = np.array(cost_matrix, dtype=np.float64)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write anyway
            arr = arr.copy()
        t = torch.from_numpy(arr)
        torch_in = False
    if t.dim() not in (2, 3):
        raise ValueError(f"expected a matrix (2-D array), got a {t.dim()} array")
    return t, torch_in


def check_values(c3: torch.Tensor, maximize: bool, batched: bool) -> None:
    """Refuse NaN, and -inf (minimising) / +inf (maximising), as scipy does (step 5), naming the batch index.

    One reduction per problem (NaN propagates through amin / amax) and one host read.
    """
    if c3.numel() == 0:
        return
    flat = c3.reshape(c3.shape[0], -1)
    if flat.device.type == "cpu":  # numpy: no torch thread-pool start-up, ~4x faster on one matrix
        a = flat.numpy()
        ext = torch.from_numpy(a.max(1) if maximize else a.min(1))
    else:
        ext = flat.amax(1) if maximize else flat.amin(1)
    # NaN propagates through min / max; the extreme is the invalid infinity only if such an entry exists
    bad = torch.isnan(ext) | (ext == (float("inf") if maximize else float("-inf")))
    bad_cpu = bad.cpu()
    if bool(bad_cpu.any()):
        if not batched:
            raise ValueError(INVALID)
        b = int(bad_cpu.nonzero()[0, 0])
        raise ValueError(f"{INVALID} (batch index {b})")


def infeasible_error(status: torch.Tensor, batched: bool) -> None:
    """``ValueError("cost matrix is infeasible")`` for status 1 (one host read), naming the batch index."""
    if status.numel() == 0:
        return
    st = status.cpu()
    bad = (st == 1).nonzero()
    if bad.numel():
        if not batched:
            raise ValueError(INFEASIBLE)
        idx = [int(i) for i in bad[:, 0]]
        more = f" and {len(idx) - 1} more" if len(idx) > 1 else ""
        raise ValueError(f"{INFEASIBLE} (batch index {idx[0]}{more})")


def check_solver_cost(cost, device_type: str):
    """The solvers' input contract (``lap_solve`` of the cpu / cuda backends): a contiguous (B, n, m)
    float64 tensor on a ``device_type`` device with ``n <= m``. Returns (B, n, m)."""
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(f"cost must be a (B, n, m) batch, got shape {tuple(cost.shape)}")
    if cost.dtype != torch.float64:
        raise TypeError(f"cost must be float64, got {cost.dtype}")
    if cost.device.type != device_type:
        raise ValueError(f"cost must be a {device_type.upper()} tensor for the {device_type} backend, "
                         f"got device {cost.device}")
    if not cost.is_contiguous():
        raise ValueError("cost must be contiguous")
    B, n, m = cost.shape
    if n > m:
        raise ValueError(f"cost must have n <= m (transpose it first), got shape {tuple(cost.shape)}")
    return B, n, m
