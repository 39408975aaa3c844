"""``python -m benchmarks gpu-check``: the no-GPU mode (plan printed, rc 0), its pure helpers, and the
correctness cases themselves run on the CPU backends (so the comparisons are known to be right
before they first run on a GPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmarks package lives in the checkout, not in the install

from benchmarks import gpu_cases as C  # noqa: E402
from benchmarks import gpu_check as G  # noqa: E402


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the real check would run")
def test_no_gpu_prints_plan_and_exits_0(tmp_path):
    p = _run("--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "no CUDA GPU" in out
    for step in G.STEPS:
        assert f". {step} (<=" in out, step
    for word in ("versions:", "WWEIGHT_STRICT=1", "backend='cuda'", "backend='triton'", str(C.BIG_N), "ties",
                 "dequant_matmul", "iso_cts", "(4097,)", "(0, 3)", "storage offset", "memcheck", "racecheck",
                 "copy bandwidth", "host syncs"):
        assert word in out, word
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


def test_plan_flag_and_step_selection(capsys):
    assert G.main(["--plan", "--steps", "build,bench"]) == 0
    out = capsys.readouterr().out
    assert ". build (<=" in out and ". bench (<=" in out and ". memcheck" not in out
    with pytest.raises(SystemExit) as e:
        G.main(["--steps", "nope"])
    assert e.value.code == 2


def test_a_failing_step_fails_the_run_and_is_reported(tmp_path, monkeypatch):
    """The GPU path of the harness, with a pretend GPU: check-cuda's child process fails (no CUDA here), the
    failure is recorded per check, the skipped steps say why, and the exit code is 1."""
    monkeypatch.setattr(G, "gpu_info", lambda: {"name": "NVIDIA Pretend 1", "count": 1, "arch": "90", "memory_GiB": 1})
    monkeypatch.setattr(G, "versions", lambda: {"torch": torch.__version__})
    monkeypatch.setattr(G, "find_sanitizer", lambda: None)
    assert G.main(["--steps", "check-cuda,memcheck,multi-gpu", "--no-build", "--out", str(tmp_path)]) == 1
    rep = json.load(open(tmp_path / "gpu_check_pretend-1.json"))
    assert [s["status"] for s in rep["steps"]] == ["fail", "skipped", "skipped"] and rep["ok"] is False
    checks = rep["steps"][0]["checks"]
    cases = [c for c in checks if c["backend"] != "-"]                  # "-": a part of the step ran to its end
    assert len(cases) > 100 and not any(c["ok"] for c in cases)          # every case ran and failed on its own
    assert "compute-sanitizer not on PATH" in open(tmp_path / "gpu_check_pretend-1.md").read()
    assert "===== check-cuda: fail =====" in open(tmp_path / "gpu_check_pretend-1.log").read()


def test_slug_and_arch():
    assert G.slug("NVIDIA H200") == "h200"
    assert G.slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert G.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert G.slug("  ") == "unknown"
    assert G.cuda_arch((9, 0)) == "90" and G.cuda_arch((12, 0)) == "120"


def test_sanitizer_summary_parsing():
    assert G.sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert G.sanitizer_errors("========= ERROR SUMMARY: 3 errors\n") == 3
    assert G.sanitizer_errors("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)") == 1
    assert G.sanitizer_errors("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)") == 0
    assert G.sanitizer_errors("python crashed before any summary") is None
    assert "Device not supported" in G.sanitizer_unsupported("x\n========= Error: Device not supported\nmore")
    assert G.sanitizer_unsupported("========= ERROR SUMMARY: 0 errors") is None


def test_step_timeout_and_overall():
    assert G.step_timeout(120, deadline=1000, now=500) == 120
    assert G.step_timeout(120, deadline=1000, now=950) == 50
    assert G.step_timeout(120, deadline=1000, now=990) is None
    assert G.overall_ok([{"status": "ok"}, {"status": "skipped"}])
    for bad in ("fail", "timeout", "not-run"):
        assert not G.overall_ok([{"status": "ok"}, {"status": bad}])


def test_bandwidth_math():
    assert C.gbps(2e9, 1.0) == 2.0
    assert C.pct_of_copy(1500.0, 3000.0) == 50.0
    assert C.op_bytes("ties", 1000, 2, K=4) == 6 * 1000 * 2           # base + 4 models + output
    assert C.op_bytes("kth_largest_abs", 1000, 4) == 4000
    assert C.op_bytes("sparsify", 1000, 4) == 8000
    assert C.op_bytes("quantize", 128, 2) == 64 + 2 * 2 * 2 + 256      # codes + fp16 scale/zero + input
    assert C.op_bytes("dequant_matmul", 128, 2) == 64 + 8


def test_compare_and_tolerances():
    a = torch.tensor([1.0, 2.0, float("nan")])
    assert C.compare(a, a.clone())[0]
    assert not C.compare(a, torch.tensor([1.0, 2.0, 3.0]))[0]                       # NaN vs a number
    assert not C.compare(a.half(), a)[0]                                            # dtype
    assert not C.compare(a[:2], a)[0]                                               # shape
    b = torch.tensor([1.0, 2.0 + 3e-7, 3.0])
    assert not C.compare(b, torch.tensor([1.0, 2.0, 3.0]))[0]                       # exact: one ulp differs
    assert C.compare(b, torch.tensor([1.0, 2.0, 3.0]), (1e-6, 1e-6))[0]
    assert not C.compare(b + 1e-3, torch.tensor([1.0, 2.0, 3.0]), (1e-6, 1e-6))[0]
    assert C.compare(torch.empty(0, 3), torch.empty(0, 3))[0]
    assert C.compare(torch.tensor([1, 2]), torch.tensor([1, 2]))[0]
    assert C.merge_tolerance("ties", torch.bfloat16) is None
    assert C.merge_tolerance("ties", torch.float32) is None
    assert C.merge_tolerance("dare_ties", torch.float32) is not None
    assert C.merge_tolerance("dare_ties", torch.bfloat16) is None
    assert C.merge_tolerance("linear", torch.bfloat16) == (1e-2, 1e-2)


def test_views():
    t = torch.arange(12.0).reshape(3, 4)
    o = C.to_view(t, "cpu", "offset")
    assert o.storage_offset() == 3 and torch.equal(o, t)
    tr = C.to_view(t, "cpu", "transposed")
    assert not tr.is_contiguous() and torch.equal(tr, t)


def test_recorder_and_jsonl(tmp_path):
    path = str(tmp_path / "s.jsonl")
    rec = C.Recorder(path)
    assert rec.check("good", "cpu", lambda: (True, "fine"))
    assert not rec.check("bad", "cpu", lambda: (False, "differs"))
    assert not rec.check("raises", "cpu", lambda: 1 / 0)
    rec.note("a note")
    rec.row({"op": "copy", "GB/s": 1.0})
    with open(path, "a") as f:
        f.write('{"check": "cut by a ki')                                            # a killed step's last line
    checks, notes, rows = G.read_jsonl(path)
    assert [c["ok"] for c in checks] == [True, False, False] and "ZeroDivisionError" in checks[2]["detail"]
    assert notes == ["a note"] and rows == [{"op": "copy", "GB/s": 1.0}] and rec.failed == 2


def test_run_boxed_kills_on_timeout(tmp_path):
    rc, timed_out, secs, _ = G.run_boxed([sys.executable, "-c", "import time; time.sleep(30)"], 1.0, dict(os.environ),
                                         str(tmp_path / "log"))
    assert timed_out and secs < 15
    rc, timed_out, _, tail = G.run_boxed([sys.executable, "-c", "print('hi'); raise SystemExit(3)"], 30,
                                         dict(os.environ), str(tmp_path / "log"))
    assert rc == 3 and not timed_out and "hi" in tail


def test_report_files(tmp_path):
    gpu = {"name": "NVIDIA H200", "count": 1, "arch": "90", "memory_GiB": 139.8}
    steps = [{"step": "check-cuda", "status": "fail", "seconds": 3.0, "notes": ["n"], "rows": [], "error": "rc 1",
              "checks": [{"check": "merge ties", "backend": "cuda", "ok": False, "detail": "2 of 7 differ"}]},
             {"step": "bench", "status": "ok", "seconds": 9.0, "notes": [], "checks": [],
              "rows": [{"op": "ties", "dtype": "bf16", "n": 8, "backend": "cuda", "ms": 1.0, "GB/s": 2000.0,
                        "%copy": 50.0, "host_syncs": 2}]}]
    base = G.write_report(str(tmp_path), gpu, {"torch": "x"}, steps, G.overall_ok(steps))
    assert base.endswith("gpu_check_h200")
    md = open(base + ".md").read()
    assert "FAIL" in md and "merge ties: 2 of 7 differ" in md and "| ties | bf16 | 8 | cuda | 1.0 | 2000.0 | 50.0 | 2 |" in md
    assert json.load(open(base + ".json"))["ok"] is False


def test_cases_pass_on_cpu_backends():
    """The gpu-check cases with the CPU backends in place of cuda/triton: every comparison holds."""
    rec = C.Recorder(os.devnull)
    cpu = torch.device("cpu")
    be = "cpu" if __import__("wweight")._dispatch.cpu_extension() is not None else "torch"
    C.check_sparse(rec, be, cpu, shapes=[(7,), (37, 29)], dtypes=("fp32", "bf16"))
    C.check_quant(rec, "torch", cpu, shapes=[(24, 61)], dtypes=("fp32", "bf16"))
    assert rec.failed == 0


def test_big_case_logic_on_a_small_cpu_tensor(tmp_path):
    """check_big's planted values and quant slices, at 2**16 + 4097 elements (h = 2**16) instead of 2**31 + 4097."""
    rec = C.Recorder(str(tmp_path / "big.jsonl"))
    be = "cpu" if __import__("wweight")._dispatch.cpu_extension() is not None else "torch"
    C.check_big(rec, be, torch.device("cpu"), n=2 ** 16 + 4097, quant_be="torch")
    checks = G.read_jsonl(str(tmp_path / "big.jsonl"))[0]
    assert len(checks) == 4 and rec.failed == 0, checks


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_cases_pass_on_interpreted_triton():
    pytest.importorskip("triton")
    rec = C.Recorder(os.devnull)
    cpu = torch.device("cpu")
    C.check_sparse(rec, "triton", cpu, shapes=[(37, 29)], dtypes=("bf16",), views=("transposed",))
    C.check_quant(rec, "triton", cpu, shapes=[(24, 61)], dtypes=("fp32",), matmul=True)
    C.check_iso_permute(rec, cpu, shapes=[(24, 40)], dtypes=("bf16",))
    assert rec.failed == 0
