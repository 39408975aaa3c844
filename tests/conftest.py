"""Test setup: with no CUDA GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, i.e. before
``wweight.kernels`` is imported, so it is set here at collection time.
"""
import os
import sys

# Test the *installed* package (with its compiled extensions, which a bare checkout does not
# have). ``python -m pytest`` from a checkout would otherwise import the source tree first. Editable installs still resolve
# to the checkout through their import hook.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a CUDA kernel that fails its self-test must fail the tests, not silently fall back
os.environ.setdefault("WWEIGHT_STRICT", "1")

import pytest  # noqa: E402

HAS_CUDA = _has_cuda
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _triton_ok():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


requires_triton = pytest.mark.skipif(not _triton_ok(), reason="triton not importable")


@pytest.fixture
def triton_device():
    """Device on which Triton kernels run here: the GPU, or the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
