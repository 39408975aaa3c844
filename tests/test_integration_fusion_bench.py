"""wweight's FusionBench algorithms against FusionBench's own (fusion-bench is an optional peer).

TIES must give FusionBench's bits (model-wide thresholds, int(d*K)+1 kept, majority sign for the zero
signs); the iso methods FusionBench's numbers to the SVD tolerance (checked against FusionBench itself
run in float64), with the non-spectral keys bit-identical.
"""
import copy
import zlib

import pytest
import torch
import torch.nn as nn

fb_method = pytest.importorskip("fusion_bench.method")
from fusion_bench.method import (  # noqa: E402
    IsotropicMergingInCommonAndTaskSubspace, IsotropicMergingInCommonSubspace, TiesMergingAlgorithm,
)
from fusion_bench.method.task_singular_vector import TaskSingularVectorMerging  # noqa: E402
from fusion_bench.modelpool import BaseModelPool  # noqa: E402

from wweight.integrations import fusion_bench as W  # noqa: E402


class Net(nn.Module):
    def __init__(self, d_in=12, h=24, d_out=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, d_out)
        self.emb = nn.Embedding(10, d_in)


def _models(K, dtype, seed, quantize=False, **shape):
    g = torch.Generator().manual_seed(seed)
    base = Net(**shape)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    fts = []
    for _ in range(K):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                d = 0.1 * torch.randn(p.shape, generator=g)
                if quantize:              # magnitude ties at the threshold and exact zeros
                    d = torch.round(d * 20) / 20
                p.add_(d)
        fts.append(m)
    return [m.to(dtype) for m in [base] + fts]


def _pool(models):
    models = [copy.deepcopy(m) for m in models]   # FusionBench's run loads the result into the pool's model
    return BaseModelPool({"_pretrained_": models[0], **{f"m{i}": m for i, m in enumerate(models[1:])}})


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _seed(*a):
    return zlib.crc32(repr(a).encode())


TIES_CASES = [(K, dt, th, mf, q) for K in (2, 3, 4) for dt in (torch.float32, torch.bfloat16)
              for th, mf, q in ((20, "sum", False), (0.1, "mean", True), (50, "max", False), (99.5, "sum", True),
                                (0.7, "dis-mean", False), (5, "max", True))]


@pytest.mark.parametrize("K,dtype,threshold,merge_func,quantize", TIES_CASES)
def test_ties_bit_identical_to_fusion_bench(K, dtype, threshold, merge_func, quantize):
    models = _models(K, dtype, _seed(K, str(dtype), threshold, merge_func), quantize=quantize)
    kw = dict(scaling_factor=0.3, threshold=threshold, remove_keys=[], merge_func=merge_func)
    want = _sd(TiesMergingAlgorithm(**kw).run(_pool(models)))
    got = _sd(W.TiesMerging(**kw).run(_pool(models)))
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert torch.equal(got[k], want[k]), k


def test_ties_keeps_fusion_bench_count_not_mergekit_count():
    """FusionBench keeps int(d*K)+1 per task over the whole model (mergekit: int(d*K) per tensor)."""
    models = _models(1, torch.float32, 7)
    base = _sd(models[0])
    d = sum(v.numel() for v in base.values())
    got = _sd(W.TiesMerging(scaling_factor=1.0, threshold=10, remove_keys=[], merge_func="sum").run(_pool(models)))
    kept = sum(int((got[k] != base[k]).sum()) for k in base)
    assert kept == int(d * 0.10) + 1


def test_ties_threshold_keeping_everything_is_an_error():
    models = _models(2, torch.float32, 3)
    with pytest.raises(ValueError, match="threshold"):
        W.TiesMerging(scaling_factor=1.0, threshold=1.0, remove_keys=[], merge_func="sum").run(_pool(models))
    with pytest.raises(ValueError, match="merge_func"):
        W.TiesMerging(scaling_factor=1.0, threshold=20, remove_keys=[], merge_func="median").run(_pool(models))


def test_ties_falls_back_to_fusion_bench_for_remove_keys_and_mixed_dtypes():
    models = _models(2, torch.float32, 11)
    for m in models:
        m.register_buffer("steps", torch.tensor(3, dtype=torch.int64))
    kw = dict(scaling_factor=0.5, threshold=20, remove_keys=[], merge_func="sum")
    want = _sd(TiesMergingAlgorithm(**kw).run(_pool(models)))
    got = _sd(W.TiesMerging(**kw).run(_pool(models)))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


ISO = [
    ("iso_c", lambda **kw: IsotropicMergingInCommonSubspace(**kw), lambda **kw: W.IsoCMerge(**kw),
     dict(scaling_factor=1.3)),
    ("iso_c_excl", lambda **kw: IsotropicMergingInCommonSubspace(**kw), lambda **kw: W.IsoCMerge(**kw),
     dict(scaling_factor=0.7, exclude_keys=["emb.weight"])),
    ("iso_cts", lambda **kw: IsotropicMergingInCommonAndTaskSubspace(**kw), lambda **kw: W.IsoCTSMerge(**kw),
     dict(scaling_factor=1.0, common_space_fraction=0.8)),
    ("iso_cts_half", lambda **kw: IsotropicMergingInCommonAndTaskSubspace(**kw), lambda **kw: W.IsoCTSMerge(**kw),
     dict(scaling_factor=0.5, common_space_fraction=0.5, exclude_keys=["fc2.weight"])),
    ("tsv_m", lambda **kw: TaskSingularVectorMerging(**kw), lambda **kw: W.TSVMerge(**kw), dict(alpha=None)),
    ("tsv_m_alpha", lambda **kw: TaskSingularVectorMerging(**kw), lambda **kw: W.TSVMerge(**kw), dict(alpha=0.6)),
    ("tsv_m_list", lambda **kw: TaskSingularVectorMerging(**kw), lambda **kw: W.TSVMerge(**kw), dict(alpha=None)),
]


@pytest.mark.parametrize("K", [2, 3, 5])
@pytest.mark.parametrize("name,fb,ww,kw", ISO, ids=[c[0] for c in ISO])
def test_iso_matches_fusion_bench(name, fb, ww, kw, K):
    kw = dict(kw)
    if name == "tsv_m_list":
        kw["alpha"] = [0.5 + 0.25 * i for i in range(K)]
    models = _models(K, torch.float32, _seed(name, K), h=24 if K != 5 else 30)
    truth = _sd(fb(**kw).run(_pool([copy.deepcopy(m).double() for m in models])))   # FusionBench in float64
    fb32 = _sd(fb(**kw).run(_pool(models)))
    got = _sd(ww(**kw).run(_pool(models)))
    excluded = set(kw.get("exclude_keys") or [])
    for k in truth:
        assert got[k].dtype == torch.float32
        spectral = got[k].dim() == 2 and k not in excluded
        if spectral:
            assert _rel(got[k], truth[k]) <= 1e-5, (k, _rel(got[k], truth[k]), _rel(fb32[k], truth[k]))
        else:   # FusionBench's mean task vector, its arithmetic: the same bits as its float32 run
            assert torch.equal(got[k], fb32[k]), k


def test_tsv_m_alpha_list_length_is_checked():
    models = _models(2, torch.float32, 5)
    with pytest.raises(ValueError, match="alpha"):
        W.TSVMerge(alpha=[1.0, 2.0, 3.0]).run(_pool(models))


def test_importing_wweight_does_not_import_fusion_bench():
    import subprocess
    import sys

    code = "import sys, wweight, wweight.integrations; print('fusion_bench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False"
