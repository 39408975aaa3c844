"""Backend selection shared by every op.

Every public op resolves one backend name before it runs:

* ``"cuda"``      the pybind11 CUDA extension (``wweight._cuda``), CUDA tensors only;
* ``"triton"``    the Triton kernels in ``wweight.kernels``; CUDA tensors, or CPU tensors
                  when ``TRITON_INTERPRET=1`` (how CI runs every Triton kernel);
* ``"cpu"``       the C++/OpenMP extension (``wweight._cpu``), CPU tensors only, for the op
                  families that have one (``has_cpu=True``);
* ``"torch"``     vectorised PyTorch (chunked, memory-bounded): the CPU product path and the
                  last fallback on any device;
* ``"reference"`` the small, obviously-right PyTorch reference in ``wweight.reference``.

``"auto"`` (the default) picks CUDA extension -> Triton -> torch on CUDA tensors and
C++ extension -> torch on CPU tensors. A backend can be forced per call (``backend=``), per block
(``with wweight.use_backend("triton"):``) or per process (``WWEIGHT_BACKEND=triton``).

The code that runs a resolved backend is :func:`backend_module` (``wweight/backends/<name>/<family>.py``).
CUDA kernels that were never run on the machine's GPU get a one-off self-test against the
reference the first time ``auto`` would choose them (``SELFTESTS`` of the family's CUDA glue).

What a failed self-test can and cannot recover from:

* **wrong numbers** (the kernel ran, the result differs): the kernel set is disabled for that
  device and ``auto`` uses Triton / torch instead, with a warning; no wrong result is returned;
* **a Python-level error** (e.g. a launch refused): the same;
* **a crash on the device** (illegal address, misaligned access, a trap): CUDA makes such an
  error *sticky*; every later CUDA call in the process fails, Triton and torch included. No
  fallback can run, so this raises ``RuntimeError`` saying so instead of pretending to fall back;
  the process must be restarted (with ``WWEIGHT_BACKEND=triton`` to avoid the kernel).

**Strict mode** (``WWEIGHT_STRICT=1``, or :func:`strict` inside a block): any failed self-test raises
instead of falling back. The test suite and the benchmarks turn it on, so an ``auto`` run can never
silently measure or test another backend than the one it names.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

from ._ext import cpu_extension, cpu_extension_error, cuda_extension, cuda_extension_error

BACKENDS = ("cuda", "triton", "cpu", "torch", "reference")
_VALID = BACKENDS + ("auto",)
_GLUE = tuple(b for b in BACKENDS if b != "reference")  # backends with a wweight/backends/<name>/ package

_local = threading.local()
_selftest_results: Dict[tuple, bool] = {}
_lock = threading.Lock()


def _check_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or name not in _VALID:
        raise ValueError(f"{argname} must be one of {list(_VALID)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every wweight op called inside the block (thread-local)."""
    _check_name(name)
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def requested(backend: Optional[str] = None) -> str:
    """The backend asked for: the argument, else the context manager, else the environment."""
    if backend is not None:
        return _check_name(backend)
    ctx = getattr(_local, "backend", None)
    if ctx is not None:
        return ctx
    env = os.environ.get("WWEIGHT_BACKEND")
    if env:
        return _check_name(env, "WWEIGHT_BACKEND")
    return "auto"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_ok: Optional[bool] = None


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
            _triton_ok = True
        except Exception:  # ImportError, or a broken install
            _triton_ok = False
    return _triton_ok


_modules: Dict[Tuple[str, str], object] = {}


def backend_module(family: str, name: str):
    """The glue of op family ``family`` for backend ``name``: ``wweight.backends.<name>.<family>``.

    Every module of one family has the same primitives (see ``wweight/backends/__init__.py``), so an
    op runs any backend through one code path. Imported on first use: the Triton glue imports
    triton, and ``TRITON_INTERPRET`` must be set before that happens.
    """
    key = (family, name)
    mod = _modules.get(key)
    if mod is None:
        if name not in _GLUE:
            raise ValueError(f"backend {name!r} has no kernel glue (expected one of {list(_GLUE)})")
        mod = importlib.import_module(f"wweight.backends.{name}.{family}")
        _modules[key] = mod
    return mod


def _selftest(family: str, op: str):
    """The CUDA self-test of kernel set ``op``: ``SELFTESTS[op]`` of ``wweight.backends.cuda.<family>``."""
    return getattr(backend_module(family, "cuda"), "SELFTESTS", {}).get(op)


def is_strict() -> bool:
    """Strict mode: a failed CUDA self-test raises instead of falling back (see the module doc)."""
    ctx = getattr(_local, "strict", None)
    if ctx is not None:
        return ctx
    return os.environ.get("WWEIGHT_STRICT", "0") not in ("", "0")


@contextlib.contextmanager
def strict(on: bool = True) -> Iterator[None]:
    """Strict mode for the ops called inside the block (thread-local)."""
    prev = getattr(_local, "strict", None)
    _local.strict = bool(on)
    try:
        yield
    finally:
        _local.strict = prev


def _context_usable(device: torch.device) -> bool:
    """False when the CUDA context of ``device`` holds a sticky error (a kernel crashed)."""
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def _cuda_op_ok(op: str, family: str, device: torch.device) -> bool:
    ext = cuda_extension()
    if ext is None or not hasattr(ext, op):
        return False
    if os.environ.get("WWEIGHT_SKIP_SELFTEST") == "1":
        return True
    key = (op, device.index)
    with _lock:
        if key not in _selftest_results:
            ok, why = True, "its result differs from the reference"
            try:
                fn = _selftest(family, op)
                if fn is not None:
                    ok = bool(fn(device))
            except Exception as e:  # a crash in the kernel counts as a failure
                ok, why = False, f"it raised {e!r}"
                if not _context_usable(device):
                    raise RuntimeError(
                        f"wweight: the CUDA self-test of {op!r} crashed on {device} ({e!r}) and left the CUDA "
                        "context unusable (a sticky device error): no backend can run in this process. Restart "
                        "it with WWEIGHT_BACKEND=triton to avoid the CUDA kernels, and please report the crash."
                    ) from e
            if not ok:
                msg = f"wweight: CUDA kernel {op!r} failed its self-test on {device}: {why}"
                if is_strict():
                    raise RuntimeError(msg + " (strict mode: WWEIGHT_STRICT=1 / wweight.strict())")
                warnings.warn(msg + "; falling back to Triton/torch for this op", RuntimeWarning, stacklevel=3)
            _selftest_results[key] = ok
        return _selftest_results[key]


def resolve(
    op: str,
    device: torch.device,
    backend: Optional[str] = None,
    *,
    family: str,
    has_cuda: bool = True,
    has_triton: bool = True,
    has_cpu: bool = False,
) -> str:
    """Pick the backend that runs ``op`` on tensors living on ``device``.

    ``op`` names the CUDA kernel set (an attribute of ``wweight._cuda``, whose self-test is
    ``SELFTESTS[op]`` in ``wweight.backends.cuda.<family>``) and prefixes the errors.
    ``has_cuda`` / ``has_triton`` / ``has_cpu`` say whether the op family has that kind of kernel.
    An explicitly requested backend that cannot run raises ``RuntimeError`` (never a silent
    substitution: benchmarks and tests rely on getting what they asked for).
    """
    want = requested(backend)
    dev = torch.device(device)
    if want == "auto":
        if dev.type == "cuda":
            if has_cuda and _cuda_op_ok(op, family, dev):
                return "cuda"
            if has_triton and triton_available():
                return "triton"
            return "torch"
        if dev.type == "cpu" and has_cpu and cpu_extension() is not None:
            return "cpu"
        return "torch"
    if want == "cuda":
        if not has_cuda:
            raise RuntimeError(f"{op}: no CUDA-extension kernel exists for this op")
        if dev.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors, got device {dev}")
        if cuda_extension() is None:
            raise RuntimeError(f"{op}: the CUDA extension is not built ({cuda_extension_error()})")
        if not hasattr(cuda_extension(), op):
            raise RuntimeError(f"{op}: the built CUDA extension has no kernel {op!r}")
        return "cuda"
    if want == "triton":
        if not has_triton:
            raise RuntimeError(f"{op}: no Triton kernel exists for this op")
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not importable")
        if dev.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"tensors), got device {dev}"
            )
        return "triton"
    if want == "cpu":
        if not has_cpu:
            raise RuntimeError(f"{op}: no C++ CPU kernel exists for this op")
        if dev.type != "cpu":
            raise RuntimeError(f"{op}: backend 'cpu' needs CPU tensors, got device {dev}")
        if cpu_extension() is None:
            raise RuntimeError(f"{op}: the C++ CPU extension is not built ({cpu_extension_error()})")
        return "cpu"
    return want  # "torch" or "reference": run anywhere


def _plain_eager(args) -> bool:
    """True when nothing but eager kernels can see this call: no ``torch.compile`` / export
    tracing, no ``__torch_dispatch__`` or ``__torch_function__`` mode (FakeTensorMode, make_fx,
    a test's sync counter), no functorch transform, every tensor a plain CPU / CUDA
    ``torch.Tensor`` with no gradient to track."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and (
                    type(t) is not torch.Tensor or t.device.type not in ("cpu", "cuda")
                    or (grad and t.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(t)):
                return False
    return True


def run_op(op, *args):
    """Call the ``torch.library`` custom op ``op`` with ``args``; in plain eager mode
    (:func:`_plain_eager`) call its function directly. The two run the same code on the same
    tensors; the direct call skips the dispatcher round trip, and in particular the first call of
    a custom op in a process, which imports ``torch._dynamo`` (about 2.5 s on the 2-core CI
    machine: a quarter of a 125M-parameter checkpoint merge, and every ``wweight merge`` run
    paid it). Under tracing, fake tensors, modes or gradients the op itself runs (its fake kernel,
    its schema checks)."""
    fn = getattr(op, "_init_fn", None)   # torch.library.custom_op keeps the decorated function there
    if fn is not None and _plain_eager(args):
        return fn(*args)
    return op(*args)


_NAMED_OPS: Dict[str, object] = {}


def register_op(name: str, op) -> None:
    """Record custom op ``op`` under ``name`` (``"wweight::..."``) for :func:`named_op`: a module that
    must not import the op's module (an import cycle) still reaches its function."""
    _NAMED_OPS[name] = op


def named_op(name: str):
    """The custom op registered as ``name`` (:func:`register_op`), else torch's registry entry."""
    op = _NAMED_OPS.get(name)
    if op is None:
        ns, short = name.split("::")
        op = getattr(getattr(torch.ops, ns), short)
    return op
