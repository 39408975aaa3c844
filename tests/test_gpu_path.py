"""What a GPU run depends on and a CPU can still test: launch grids at the largest sizes, histogram
width, the device guard (mocked device index), self-test strictness, the CUDA version check."""
import contextlib
import warnings

import pytest
import torch

from conftest import requires_triton
from wweight import _dispatch, _ext

SIZES = [0, 1, 1000, 2 ** 31 - 1, 2 ** 31 + 4096, 2 ** 32 + 7, 2 ** 34]


# ----------------------------------------------------------------------------- grids
@requires_triton
@pytest.mark.parametrize("n", SIZES)
def test_triton_grids_within_hardware_limits_up_to_2_34(n):
    from wweight.backends.triton import iso, quant, sparse
    from wweight.backends.triton.launch import check_grid

    for target in (4, 132 * 8, 144 * 8):
        grid, per = sparse.hist_grid(n, 2 * 64, target)
        check_grid(grid)
        assert per * sparse.HIST_BLOCK <= sparse.HIST_MAX_PER_PROGRAM      # int32 per-program counters
        assert grid[0] * per * sparse.HIST_BLOCK >= n                       # every element counted
    check_grid(sparse.block_grid(n, 2 * 64))
    check_grid(iso.task_vector_grid(n))
    ngroups = -(-n // 8)
    check_grid(quant.group_grid(ngroups))
    for bs in (8, 64, 100, 4096, 8192, 28672, max(n, 1)):   # ... "row" of a wide matrix, "tensor"
        nb = max(1, -(-n // bs))
        check_grid(quant.stats_grid(nb, bs))
        if quant.fused_ok(bs, torch.float16):
            gp = 1 << max(0, (bs // 8 - 1).bit_length())
            check_grid(quant.fused_grid(nb, max(1, 256 // gp)))
    check_grid(quant.matmul_grid(4096, max(1, min(n, 2 ** 24)), 64, 64))


def test_check_grid_refuses_past_the_limits():
    from wweight.backends.triton.launch import check_grid

    assert check_grid((5,)) == (5, 1, 1)
    with pytest.raises(ValueError, match="axis y = 65536"):
        check_grid((1, 65536))
    with pytest.raises(ValueError, match="axis x"):
        check_grid((2 ** 31,))


@requires_triton
def test_old_quant_stats_grid_would_have_failed():
    # the review's case: block_size="tensor" on an 8192 x 28672 weight put 229,376 on grid.y
    from wweight.backends.triton import quant

    n = 8192 * 28672
    (x,) = quant.stats_grid(1, n)
    assert x == -(-n // 1024)      # now one axis, < 2**31


# ----------------------------------------------------------------------------- histogram width
@requires_triton
def test_histogram_buffer_is_int64(triton_device):
    from wweight.backends.triton import sparse
    from wweight.backends.triton.launch import recording

    x = torch.randn(3000, device=triton_device)
    with recording() as launches:
        h = sparse.digit_hist([x], None, torch.zeros(1, dtype=torch.int64, device=triton_device),
                              torch.zeros(1, dtype=torch.int64, device=triton_device), 21, 10, 31, False)
    assert h.dtype == torch.int64 and int(h.sum()) == 3000
    (kernel, grid, args, kwargs), = launches
    assert args[4].dtype == torch.int64          # the kernel's global histogram


# ----------------------------------------------------------------------------- device guard
class _FakeDevice:
    """Mocks ``torch.cuda.device`` / ``current_device``: records the device a launch runs under."""

    def __init__(self):
        self.current = 0

    def device(self, dev):
        @contextlib.contextmanager
        def cm():
            prev, self.current = self.current, torch.device(dev).index
            try:
                yield
            finally:
                self.current = prev
        return cm()


def test_cuda_glue_runs_under_the_tensors_device(monkeypatch):
    from wweight.backends.cuda import quant as cq
    from wweight.backends.cuda import sparse as cs

    fake = _FakeDevice()
    seen = []
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(_ext, "cuda_device_of", lambda args: torch.device("cuda", 1))

    class Ext:
        def __getattr__(self, name):
            return lambda *a: seen.append((name, fake.current))

    monkeypatch.setattr(cs, "cuda_extension", lambda: Ext())
    monkeypatch.setattr(cs, "stream", lambda t: 0)
    x = torch.randn(100)
    cs.digit_hist([x], None, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 21, 10, 31, False)
    cs.tie_counts([x], None, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert seen == [("sparse_digit_hist", 1), ("sparse_tie_counts", 1)]
    assert fake.current == 0                      # restored afterwards
    # every primitive of the CUDA glue is wrapped
    for mod, names in ((cs, ("digit_hist", "tie_counts", "rescale_stats", "merge")),
                       (cq, ("quantize", "dequantize", "block_stats", "quantize_fused", "quantize_pack"))):
        for name in names:
            assert getattr(getattr(mod, name), "device_guarded", False), f"{mod.__name__}.{name}"


def test_cuda_device_of_finds_tensors_in_lists():
    assert _ext.cuda_device_of([torch.zeros(1), [torch.zeros(1)], 3]) is None   # CPU tensors: no guard


@requires_triton
def test_triton_launch_runs_under_the_tensors_device(monkeypatch):
    from wweight.backends.triton import launch as L

    fake = _FakeDevice()
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(_ext, "cuda_device_of", lambda args: torch.device("cuda", 1))
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((grid, fake.current, k["enable_fp_fusion"]))

    L.launch(Kernel(), (3,), torch.zeros(1), X=1)
    assert seen == [((3, 1, 1), 1, False)]


# ----------------------------------------------------------------------------- self-test strictness
@pytest.fixture
def fake_cuda_op(monkeypatch):
    class Ext:
        fake_op = object()

    monkeypatch.setattr(_dispatch, "cuda_extension", lambda: Ext())
    monkeypatch.setattr(_dispatch, "_selftest_results", {})
    monkeypatch.delenv("WWEIGHT_SKIP_SELFTEST", raising=False)

    def use(selftest, context_ok=True):
        monkeypatch.setattr(_dispatch, "_selftest", lambda family, op: selftest)
        monkeypatch.setattr(_dispatch, "_context_usable", lambda device: context_ok)
    return use


def _wrong(device):
    return False


def _crash(device):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_failed_selftest_raises_in_strict_mode(fake_cuda_op, monkeypatch):
    fake_cuda_op(_wrong)
    monkeypatch.setenv("WWEIGHT_STRICT", "1")
    with pytest.raises(RuntimeError, match="fake_op.*failed its self-test.*strict mode"):
        _dispatch._cuda_op_ok("fake_op", "sparse", torch.device("cuda", 0))


def test_failed_selftest_falls_back_loudly_outside_strict_mode(fake_cuda_op, monkeypatch):
    fake_cuda_op(_wrong)
    monkeypatch.setenv("WWEIGHT_STRICT", "0")
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert _dispatch._cuda_op_ok("fake_op", "sparse", torch.device("cuda", 0)) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # decided once per (op, device)
        assert _dispatch._cuda_op_ok("fake_op", "sparse", torch.device("cuda", 0)) is False
    with _dispatch.strict():
        assert _dispatch.is_strict()
    assert not _dispatch.is_strict()


def test_crash_that_poisons_the_context_is_an_error_even_outside_strict_mode(fake_cuda_op, monkeypatch):
    fake_cuda_op(_crash, context_ok=False)
    monkeypatch.setenv("WWEIGHT_STRICT", "0")
    with pytest.raises(RuntimeError, match="context unusable.*no backend can run"):
        _dispatch._cuda_op_ok("fake_op", "sparse", torch.device("cuda", 0))


def test_crash_with_a_usable_context_falls_back(fake_cuda_op, monkeypatch):
    fake_cuda_op(_crash, context_ok=True)
    monkeypatch.setenv("WWEIGHT_STRICT", "0")
    with pytest.warns(RuntimeWarning, match="raised.*illegal memory access"):
        assert _dispatch._cuda_op_ok("fake_op", "sparse", torch.device("cuda", 0)) is False


# ----------------------------------------------------------------------------- CUDA versions
@pytest.mark.parametrize("built, torch_cuda, driver, expect", [
    (13000, None, 13000, None),            # CPU-only torch: the kernels are never picked
    (13000, "13.0", 0, None),              # no driver: no CUDA tensors
    (13000, "13.0", 13020, None),
    (13020, "13.0", 13000, None),          # minor version compatibility
    (13000, "12.8", 13000, "built with CUDA 13.0.*torch uses CUDA 12.8"),
    (13000, "13.0", 12080, "driver supports only CUDA 12.8"),
])
def test_cuda_version_mismatch_message(built, torch_cuda, driver, expect):
    msg = _ext.cuda_build_problem(built, torch_cuda, driver)
    if expect is None:
        assert msg is None
    else:
        assert msg is not None and pytest.importorskip("re").search(expect, msg), msg
        assert "WWEIGHT_BUILD_CUDA=0" in msg and "disabled" in msg


def test_mismatched_extension_is_disabled_with_one_message(monkeypatch):
    class Mod:
        CUDA_RUNTIME_VERSION = 13000

        @staticmethod
        def cuda_driver_version():
            return 13000

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: Mod)
    monkeypatch.setattr(_ext, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="torch uses CUDA 12.8"):
        assert _ext.cuda_extension() is None
    assert "torch uses CUDA 12.8" in _ext.cuda_extension_error()
