"""The compiled extensions and the glue every raw-pointer kernel call needs.

* ``wweight._cuda`` (nvcc, ``csrc/*.cu``) and ``wweight._cpu`` (host compiler, ``csrc/cpu/*.cpp``)
  are optional: each is imported once, and when it is missing the reason is kept for error
  messages (:func:`cuda_extension_error`, :func:`cpu_extension_error`).
* Kernels take raw addresses (:func:`ptr`), a dtype code (:data:`DTYPE_CODES`) and, on CUDA,
  torch's current stream (:func:`stream`), so the extensions build without torch's C++ headers.

:data:`DTYPE_CODES` is the one Python copy of ``enum wweight::DType`` in ``csrc/dtype.h``; both
extensions export that enum as ``DTYPE_CODES`` and ``tests/test_layout.py`` checks they agree.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

#: torch dtype -> ``wweight::DType`` (``csrc/dtype.h``)
DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_loaded: Dict[str, Tuple[object, Optional[str]]] = {}   # module name -> (module or None, import error or None)


def _extension(name: str):
    """Import a compiled extension once; remember the module or why it is missing."""
    if name not in _loaded:
        try:
            _loaded[name] = (importlib.import_module(name), None)
        except Exception as e:  # not built (no nvcc/compiler at install time) or no driver
            _loaded[name] = (None, f"{type(e).__name__}: {e}")
    return _loaded[name]


def cuda_extension():
    """The compiled ``wweight._cuda`` module, or None when it was not built."""
    return _extension("wweight._cuda")[0]


def cuda_extension_error() -> Optional[str]:
    return _extension("wweight._cuda")[1]


def cpu_extension():
    """The compiled ``wweight._cpu`` module (C++/OpenMP), or None when it was not built."""
    return _extension("wweight._cpu")[0]


def cpu_extension_error() -> Optional[str]:
    return _extension("wweight._cpu")[1]


def dtype_code(t) -> int:
    """``wweight::DType`` of a tensor (or of a torch dtype)."""
    dt = t if isinstance(t, torch.dtype) else t.dtype
    try:
        return DTYPE_CODES[dt]
    except KeyError:
        raise TypeError(f"compiled kernels take float32/float16/bfloat16 tensors, got {dt}") from None


def ptr(t: Optional[torch.Tensor]) -> int:
    """Address of a contiguous tensor (0 for None or an empty tensor)."""
    return t.data_ptr() if t is not None and t.numel() else 0


def ptrs(xs) -> list:
    """Addresses of a list of tensors (the K inputs of a merge)."""
    return [x.data_ptr() for x in xs]


def stream(t: torch.Tensor) -> int:
    """The raw handle of torch's current stream on ``t``'s device (kernels are ordered with torch's)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def device_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host-built table (a list, or a CPU tensor) as a tensor on ``device``, without a host sync.

    On CUDA the values go through pinned memory and a non-blocking copy on the current stream (torch's
    caching host allocator keeps the pinned block until the copy is done); a pageable
    ``torch.tensor(values, device=cuda)`` would wait for the stream. On the CPU it is the plain tensor.
    """
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
