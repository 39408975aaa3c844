"""The install builds what the machine can build: the C++ CPU extension always (a host compiler is
required by the install), the CUDA extension whenever nvcc is on the PATH (it must import without a
GPU or a CUDA torch, since it binds raw pointers only)."""
import os
import shutil

import pytest

import torch

from wweight import _dispatch, _ext


def test_cpu_extension_built():
    if os.environ.get("WWEIGHT_BUILD_CPU", "auto").lower() in ("0", "off", "false", "no"):
        pytest.skip("WWEIGHT_BUILD_CPU=0")
    ext = _dispatch.cpu_extension()
    assert ext is not None, _dispatch.cpu_extension_error()
    for name in ("sparse_digit_hist", "sparse_tie_counts", "sparse_rescale_stats", "sparse_merge"):
        assert hasattr(ext, name)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on the PATH: the CUDA extension is not built")
def test_cuda_extension_built_and_importable_without_gpu():
    flag = os.environ.get("WWEIGHT_BUILD_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        pytest.skip("WWEIGHT_BUILD_CUDA=0")
    import ctypes.util

    driver = os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None
    if flag not in ("1", "on", "true", "yes") and not driver:
        pytest.skip("no NVIDIA driver and WWEIGHT_BUILD_CUDA unset: setup.py skips the CUDA extension (CI sets it)")
    ext = _dispatch.cuda_extension()
    assert ext is not None, _dispatch.cuda_extension_error()
    for name in ("sparse_digit_hist", "sparse_tie_counts", "sparse_rescale_stats", "sparse_merge",
                 "quant_dequant", "quant_pack", "quant_stats"):
        assert hasattr(ext, name), name
    # the CUDA runtime it was built against, checked at import against torch's CUDA and the driver
    assert ext.CUDA_RUNTIME_VERSION >= 11000
    assert isinstance(ext.cuda_driver_version(), int)
    assert _ext.check_cuda_build(ext) is None or torch.version.cuda is not None
