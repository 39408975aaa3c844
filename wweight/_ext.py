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

import contextlib
import functools
import importlib
import warnings
from typing import Dict, Optional, Tuple

import torch

#: torch dtype -> ``wweight::DType`` (``csrc/dtype.h``)
DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_loaded: Dict[str, Tuple[object, Optional[str]]] = {}   # module name -> (module or None, import error or None)


def _extension(name: str):
    """Import a compiled extension once; remember the module or why it is missing."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(name)
            problem = check_cuda_build(mod) if name == "wweight._cuda" else None
            if problem:
                warnings.warn(f"wweight: {problem}", RuntimeWarning, stacklevel=3)
                _loaded[name] = (None, problem)
            else:
                _loaded[name] = (mod, None)
        except Exception as e:  # not built (no nvcc/compiler at install time) or no driver
            _loaded[name] = (None, f"{type(e).__name__}: {e}")
    return _loaded[name]


def _major_minor(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_build_problem(built: int, torch_cuda: Optional[str], driver: int) -> Optional[str]:
    """Why ``wweight._cuda`` (built against CUDA runtime ``built``, e.g. 13000) cannot run next to
    torch's CUDA ``torch_cuda`` (e.g. ``"12.8"``; None for a CPU-only torch) and the driver's CUDA
    ``driver`` (0: no driver), or None. Only the major versions must agree: CUDA's minor version
    compatibility runs a 13.x runtime on any 13.y driver."""
    if torch_cuda is None or driver == 0:
        return None          # no CUDA tensors can exist here: the kernels are never picked
    how = ("rebuild it with the matching nvcc (NVCC=/path/to/nvcc pip install --force-reinstall --no-deps .), "
           "or skip it (WWEIGHT_BUILD_CUDA=0); the Triton and torch backends still run")
    b_major, t_major, d_major = built // 1000, int(str(torch_cuda).split(".")[0]), driver // 1000
    if b_major != t_major:
        return (f"wweight._cuda was built with CUDA {_major_minor(built)} (the nvcc found at install time) "
                f"but torch uses CUDA {torch_cuda}; the CUDA kernels are disabled: {how}")
    if d_major < b_major:
        return (f"wweight._cuda was built with CUDA {_major_minor(built)} but the NVIDIA driver supports only "
                f"CUDA {_major_minor(driver)}; the CUDA kernels are disabled: update the driver or {how}")
    return None


def check_cuda_build(mod) -> Optional[str]:
    """:func:`cuda_build_problem` for the imported extension (None for a build without the versions)."""
    built = getattr(mod, "CUDA_RUNTIME_VERSION", None)
    if built is None or not hasattr(mod, "cuda_driver_version"):
        return None
    return cuda_build_problem(int(built), torch.version.cuda, int(mod.cuda_driver_version()))


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


def cuda_device_of(args) -> Optional[torch.device]:
    """The device of the first CUDA tensor among ``args`` (looking one level into lists and tuples)."""
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                return t.device
    return None


def device_guard(args):
    """A context running under the device of the first CUDA tensor among ``args`` (a no-op when there
    is none, or it is already current). Shared by :func:`on_tensor_device` and the Triton ``launch``."""
    dev = cuda_device_of(args)
    if dev is None or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def on_tensor_device(fn):
    """Run ``fn`` (a glue primitive) under the CUDA device of its tensors.

    CUDA kernels launch on the *current* device while the stream, allocations and pointers come
    from the tensors' device: a tensor on ``cuda:1`` with ``cuda:0`` current is an invalid-handle
    error or an illegal address. Every CUDA-glue primitive is wrapped (``tests/test_gpu_path.py``).
    """
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        with device_guard(list(args) + list(kwargs.values())):
            return fn(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


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


#: outputs at least this large get transparent huge pages on Linux (see :func:`empty_like`)
HUGE_PAGE_MIN_BYTES = 8 << 20


def host_buffer(nbytes: int) -> torch.Tensor:
    """A flat ``uint8`` CPU buffer of ``nbytes`` (contents undefined): recycled from the checkpoint
    engine's pool when one is active (:mod:`wweight._pool`), else fresh, with a large one advised to
    use transparent huge pages before its first write (see :func:`empty_like`)."""
    from . import _pool

    buf = _pool.take(nbytes)
    if buf is not None:
        return buf
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        ext = cpu_extension()
        if ext is not None and hasattr(ext, "advise_huge_pages"):
            ext.advise_huge_pages(buf.data_ptr(), nbytes)
    return buf


def host_tensor(nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """A contiguous CPU tensor of ``shape`` / ``dtype`` (``nbytes`` bytes) on a :func:`host_buffer`.
    It is set on the buffer's storage, not a view of it: no ``_base`` keeps a second tensor on the
    memory, so the engine's pool can tell when nothing holds it any more."""
    buf = host_buffer(nbytes)
    return torch.empty(0, dtype=dtype).set_(buf.untyped_storage(), 0, tuple(shape))


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` for a kernel's output; on CPU (Linux, the C++ extension built) a large
    buffer is advised to use transparent huge pages before its first write. Every fresh output is
    first touched by the kernel that fills it, and on a 4 KB page that costs a page fault per page:
    about 30 ms for 64 MB on the 2-core CI VM against 8 ms with 2 MB pages
    (``benchmarks/results/sparse_cpu.md``). Only the 2 MB-aligned inside of the buffer is advised,
    so no other allocation's pages change. Inside a checkpoint merge (:mod:`wweight._pool`) a
    contiguous CPU output reuses a buffer of an earlier work item instead."""
    if t.device.type == "cpu" and t.is_contiguous() and t.nbytes:
        return host_tensor(t.nbytes, t.dtype, t.shape)
    return torch.empty_like(t)
