"""Issue 15: public ops call their custom op's function directly in plain eager mode
(``wweight._dispatch.run_op``), and go through ``torch.library`` whenever anything could be tracing.

The direct call exists because the first call of a ``torch.library`` custom op imports
``torch._dynamo`` (seconds on a 2-core machine, paid by every ``wweight merge``). The tests check
both halves: a process that only uses the ops eagerly never imports it, and under a dispatch mode
the op itself runs, with the same numbers."""
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wweight


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _calls():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 24, generator=g)
    ts = [base + 0.1 * torch.randn(40, 24, generator=g) for _ in range(3)]
    return {
        "merge_tensors": lambda: wweight.merge_tensors("ties", base, ts, density=0.4, seed=1),
        "kth_largest_abs": lambda: wweight.kth_largest_abs(ts[0] - base, 17),
        "sparsify": lambda: wweight.sparsify(ts[0] - base, density=0.3, method="magnitude"),
        "quant_quantize": lambda: wweight.quantize(base, bits=4, block_size=32).codes,
        "quant_dequantize": lambda: wweight.dequantize(wweight.quantize(base, bits=4, block_size=32)),
        "linear_sum_assignment": lambda: wweight.linear_sum_assignment(base[:8, :8])[1],
        "iso_merge_batch": lambda: wweight.merge_state_dicts("iso_c", {"w": base}, [{"w": t} for t in ts])["w"],
    }


def test_dispatch_mode_sees_the_op_and_the_same_numbers():
    for name, call in _calls().items():
        eager = call()
        log = _Log()
        with log:
            traced = call()
        assert f"wweight.{name}.default" in log.ops, (name, log.ops[:8])
        assert torch.equal(eager, traced), name


class _OpSpy:
    """Records the qualified name of every ``torch.library`` custom op called while active."""

    def __enter__(self):
        self.seen = []
        self.real = real = torch._library.custom_ops.CustomOpDef.__call__
        seen = self.seen

        def spy(op, *a, **k):
            seen.append(op._qualname)
            return real(op, *a, **k)

        torch._library.custom_ops.CustomOpDef.__call__ = spy
        return self

    def __exit__(self, *exc):
        torch._library.custom_ops.CustomOpDef.__call__ = self.real


def test_eager_calls_skip_the_dispatcher():
    """In plain eager mode no ``wweight`` op reaches the dispatcher (a mode would see it)."""
    with _OpSpy() as spy:
        for call in _calls().values():
            call()
    assert spy.seen == []


def test_gradients_go_through_the_op():
    x = torch.randn(50, requires_grad=True)
    with _OpSpy() as spy:
        try:
            wweight.kth_largest_abs(x, 5)
        except Exception:   # noqa: BLE001 - what the op does with a gradient is torch's business here
            pass
    assert spy.seen == ["wweight::kth_largest_abs"]


def test_a_merge_process_never_imports_dynamo(tmp_path):
    script = (
        "import sys, torch, wweight\n"
        "b = torch.randn(300); ts = [b + 0.1 * torch.randn(300) for _ in range(3)]\n"
        "wweight.merge_tensors('ties', b, ts, density=0.5)\n"
        "wweight.merge_tensors('linear', None, ts)\n"
        "wweight.merge_tensors('dare_ties', b, ts, density=0.5, seed=0)\n"
        "wweight.dequantize(wweight.quantize(b.reshape(10, 30), bits=4, block_size=30))\n"
        "wweight.merge_state_dicts('iso_cts', {'w': b.reshape(20, 15)}, [{'w': t.reshape(20, 15)} for t in ts])\n"
        "print('torch._dynamo' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False", r.stdout
