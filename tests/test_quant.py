"""Blockwise RTN quantization with outliers: reference semantics, every backend against the
reference, packing, outlier selection, storage, error report, super-weight detection, bad input."""
import math

import pytest
import torch

import wweight
from wweight import quant as Q
from wweight.quant import ops as QO
from wweight.reference import quant as R

from conftest import requires_cuda, requires_triton

BITS = (2, 3, 4, 5, 6, 7, 8)


def _w(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w.to(dtype)


# ---------------------------------------------------------------- the reference itself
def test_reference_pack_known_bytes():
    # 2 bits: 0,1,2,3 -> 00 01 10 11 = 27; padded with zero codes to 8 codes = 2 bytes
    assert R.pack(torch.tensor([0, 1, 2, 3]), 2).tolist() == [27, 0]
    # 3 bits: 0..7 -> 000 001 010 011 100 101 110 111 = 0x05 0x39 0x77
    assert R.pack(torch.arange(8), 3).tolist() == [0x05, 0x39, 0x77]
    # 4 bits: high nibble first (bitsandbytes' order)
    assert R.pack(torch.tensor([1, 2, 15, 0, 0, 0, 0, 7]), 4).tolist() == [0x12, 0xF0, 0x00, 0x07]
    assert R.pack(torch.tensor([200, 3]), 8).tolist() == [200, 3, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("bits", BITS)
def test_reference_unpack_inverts_pack(bits):
    c = torch.randint(0, 1 << bits, (29,), generator=torch.Generator().manual_seed(bits))
    p = R.pack(c, bits)
    assert p.numel() == math.ceil(29 / 8) * bits  # no waste beyond the last group of 8
    assert torch.equal(R.unpack(p, bits, 29), c.to(torch.uint8))


def test_reference_minmax_rtn_by_hand():
    w = torch.tensor([0.0, 0.1, 0.29, 0.3, -1.0, 1.0, 0.5, 0.25])
    packed, scale, zero, idx, _ = R.quantize(w, 2, 4, scale_dtype=torch.float32)
    # block 0: lo 0, hi .3, scale .1 -> codes 0 1 3 3 ; block 1: lo -1, hi 1, scale 2/3
    assert torch.allclose(scale, torch.tensor([0.1, 2 / 3]))
    assert torch.equal(zero, torch.tensor([0.0, -1.0]))
    c = R.unpack(packed, 2, 8).tolist()
    assert c[:4] == [0, 1, 3, 3]
    assert c[4:] == [0, 3, 2, 2]  # (0.5+1)/(2/3) = 2.25 -> 2 ; (0.25+1)*1.5 = 1.875 -> 2


def test_reference_outliers_excluded_from_stats():
    w = torch.tensor([0.0, 1.0, 2.0, 100.0])
    mask = torch.tensor([False, False, False, True])
    _, scale, zero, idx, val = R.quantize(w, 2, 4, outlier_mask=mask, scale_dtype=torch.float32)
    assert scale.tolist() == pytest.approx([2 / 3]) and zero.tolist() == [0.0]
    assert idx.tolist() == [3] and val.tolist() == [100.0]


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("symmetric", (False, True))
def test_error_bounded_by_half_step(bits, symmetric):
    w = _w((1000,), 1)
    q = wweight.quantize(w, bits, 100, symmetric=symmetric, scale_dtype=torch.float32)
    d = wweight.dequantize(q)
    step = q.scale.float().repeat_interleave(100)
    # RTN: every element within half a step (symmetric: |w| <= absmax = (2**(b-1)-1) * scale is in range)
    assert bool(((d - w).abs() <= step * 0.5 + 1e-6).all())


# ---------------------------------------------------------------- backends against the reference
def _ref_parts(w, bits, bs, symmetric, mask, clip=None, scale_dtype=torch.float16):
    return R.quantize(w, bits, bs, symmetric, mask, clip, scale_dtype)


def _check_against_reference(w, bits, bs, symmetric, outliers, backend, clip=None):
    mask = None
    if isinstance(outliers, float):
        mask = R.outlier_mask_fraction(w, outliers)
    elif isinstance(outliers, dict):
        mask = R.outlier_mask_zscore(w, outliers["zscore"])
    elif isinstance(outliers, torch.Tensor):
        mask = torch.zeros(w.shape, dtype=torch.bool)
        mask[tuple(outliers.t())] = True
    packed, scale, zero, idx, val = _ref_parts(w, bits, bs, symmetric, mask, clip)
    q = wweight.quantize(w, bits, bs, symmetric=symmetric, outliers=outliers, clip=clip, backend=backend)
    assert torch.equal(q.scale, scale)
    assert (zero is None and q.zero is None) or torch.equal(q.zero, zero)
    assert torch.equal(q.codes, packed), f"codes differ in {(q.codes != packed).sum()} bytes"
    assert torch.equal(q.outlier_idx.long(), idx)
    assert torch.equal(q.outlier_val, val)
    ref = R.dequantize(packed, scale, zero, idx, val, w.shape, w.dtype, bits, bs)
    d = wweight.dequantize(q, backend=backend)
    assert d.dtype == w.dtype and d.shape == w.shape
    assert torch.equal(d, ref)
    if idx.numel():  # outliers come back bit-exact
        assert torch.equal(d.reshape(-1)[idx], w.reshape(-1)[idx])
    return q


CASES = [
    # bits, block, symmetric, outliers
    (4, 64, False, None),
    (3, 64, False, 0.01),
    (2, 100, True, 0.02),
    (5, "row", False, {"zscore": 3.0}),
    (6, "tensor", True, None),
    (7, 37, False, 0.005),
    (8, 1000, False, torch.tensor([[0, 0], [5, 17]])),
]


@pytest.mark.parametrize("bits,bs,sym,outliers", CASES)
def test_torch_backend_matches_reference(bits, bs, sym, outliers):
    w = _w((24, 61), bits)
    w[5, 17] = 25.0
    _check_against_reference(w, bits, bs if not isinstance(bs, str) else {"row": 61, "tensor": 24 * 61}[bs],
                             sym, outliers, "torch")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64))
def test_torch_backend_dtypes(dtype):
    w = _w((40, 50), 3, dtype)
    _check_against_reference(w, 4, 64, False, 0.01, "torch")
    _check_against_reference(w, 3, 50, True, None, "torch", clip=0.9)


@pytest.mark.parametrize("workers", [1, 3])
def test_torch_backend_chunk_boundaries(monkeypatch, workers):
    # small chunks so that blocks straddle chunk boundaries (head / middle / tail segments) and,
    # with 3 worker threads, the boundaries between the threads' runs of chunks
    from wweight.backends.torch import quant as C

    monkeypatch.setattr(C, "CHUNK", 48)
    monkeypatch.setattr(C, "_workers", lambda: workers)
    w = _w((1003,), 9)
    for bits, bs in ((3, 7), (5, 100), (4, 1003), (2, 8)):
        _check_against_reference(w, bits, bs, False, 0.01, "torch")
        _check_against_reference(w, bits, bs, True, None, "torch")


@requires_triton
@pytest.mark.parametrize("bits,bs,sym,outliers", CASES)
def test_triton_matches_reference(bits, bs, sym, outliers, triton_device):
    w = _w((24, 61), bits + 10)
    w[5, 17] = -25.0
    bs_i = bs if not isinstance(bs, str) else {"row": 61, "tensor": 24 * 61}[bs]
    if triton_device == "cpu":
        _check_against_reference(w, bits, bs_i, sym, outliers, "triton")
    else:  # pragma: no cover - GPU: FMA contraction may move dequantized values by an ulp
        q = wweight.quantize(w.to(triton_device), bits, bs_i, symmetric=sym,
                             outliers=outliers if not isinstance(outliers, torch.Tensor) else outliers.cuda(),
                             backend="triton")
        ref = wweight.quantize(w, bits, bs_i, symmetric=sym, outliers=outliers, backend="reference")
        assert torch.equal(q.codes.cpu(), ref.codes)
        torch.testing.assert_close(wweight.dequantize(q).cpu(), wweight.dequantize(ref), rtol=1e-6, atol=1e-6)


@requires_triton
def test_triton_half_and_large_block(triton_device):
    if triton_device != "cpu":
        pytest.skip("interpreter-specific shapes")
    w = _w((3000,), 4, torch.float16)
    _check_against_reference(w, 4, 2500, False, 0.001, "triton")  # block > 1024 columns: 3 chunks
    _check_against_reference(w.to(torch.bfloat16), 3, 3000, True, {"zscore": 4.0}, "triton")
    # bf16 output rounding (the interpreter itself truncates fp32 -> bf16 casts)
    _check_against_reference(_w((1000,), 0, torch.bfloat16), 4, 64, False, None, "triton")


@requires_triton
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_fused_and_two_pass_paths(fused, scale_dtype, triton_device, monkeypatch):
    from wweight.backends.triton import quant as K

    if triton_device != "cpu":
        pytest.skip("exactness of the interpreter run")
    if not fused:
        monkeypatch.setattr(K, "FUSED_MAX_BLOCK", 0)  # force stats kernel + torch finalize + pack kernel
    w = _w((1000,), 40)
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[[3, 500]] = True
    for bits, bs, sym, clip in ((4, 64, False, None), (3, 200, True, 0.8), (5, 104, False, 0.9)):
        packed, scale, zero, idx, val = R.quantize(w, bits, bs, sym, mask, clip, scale_dtype)
        q = wweight.quantize(w, bits, bs, symmetric=sym, outliers=torch.tensor([[3], [500]]), clip=clip,
                             scale_dtype=scale_dtype, backend="triton")
        assert torch.equal(q.scale, scale) and (zero is None or torch.equal(q.zero, zero))
        assert torch.equal(q.codes, packed) and torch.equal(q.outlier_idx.long(), idx)


@requires_cuda
@pytest.mark.parametrize("bits,bs,sym,outliers", CASES)
def test_cuda_matches_reference(bits, bs, sym, outliers):  # pragma: no cover - needs a GPU
    from wweight import _dispatch

    if _dispatch.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    w = _w((24, 61), bits)
    bs_i = bs if not isinstance(bs, str) else {"row": 61, "tensor": 24 * 61}[bs]
    o = outliers.cuda() if isinstance(outliers, torch.Tensor) else outliers
    q = wweight.quantize(w.cuda(), bits, bs_i, symmetric=sym, outliers=o, backend="cuda")
    ref = wweight.quantize(w, bits, bs_i, symmetric=sym, outliers=outliers, backend="reference")
    assert torch.equal(q.codes.cpu(), ref.codes)
    assert torch.equal(wweight.dequantize(q, backend="cuda").cpu(), wweight.dequantize(ref))


# ---------------------------------------------------------------- outlier selection
def test_fraction_selects_exact_top_k():
    w = _w((5000,), 11)
    q = wweight.quantize(w, 4, 64, outliers=0.003)
    k = int(0.003 * 5000)
    top = torch.topk(w.abs(), k).indices.sort().values
    assert torch.equal(q.outlier_idx.long(), top)


def test_fraction_ties_are_all_kept():
    w = torch.tensor([1.0, -3.0, 3.0, 0.5, 2.0, 3.0, 0.0, 0.25])
    q = wweight.quantize(w, 4, 8, outliers=0.25)  # k = 2, but three elements have |w| = 3
    assert q.outlier_idx.tolist() == [1, 2, 5]


def test_union_of_specs_and_coords():
    w = _w((10, 10), 12)
    coords = torch.tensor([[0, 1], [9, 9]])
    q = wweight.quantize(w, 4, 16, outliers=[coords, 0.01])
    top = int(w.abs().reshape(-1).argmax())
    assert set(q.outlier_idx.tolist()) == {1, 99, top}
    q2 = wweight.quantize(w, 4, 16, outliers={"coords": coords, "fraction": 0.01})
    assert torch.equal(q.outlier_idx, q2.outlier_idx)


def test_outliers_hold_out_super_weight_and_help():
    w = _w((64, 256), 13) * 0.02
    w[7, 100] = 3.0  # a super weight: 150x the typical magnitude
    plain = wweight.error_report(w, wweight.quantize(w, 3, "tensor"))
    kept = wweight.error_report(w, wweight.quantize(w, 3, "tensor", outliers=torch.tensor([[7, 100]])))
    assert kept["sqnr_db"] > plain["sqnr_db"] + 20
    d = wweight.dequantize(wweight.quantize(w, 3, "tensor", outliers=torch.tensor([[7, 100]])))
    assert d[7, 100].item() == 3.0


# ---------------------------------------------------------------- container, storage
def test_bits_per_param_counts_everything():
    w = _w((128, 64), 14)
    q = wweight.quantize(w, 3, 64, outliers=0.01)
    n = w.numel()
    k = q.num_outliers
    expect = (n * 3 + (n // 64) * 16 * 2 + k * (32 + 32)) / n
    assert q.bits_per_param == pytest.approx(expect)
    assert q.nbytes * 8 == pytest.approx(expect * n)
    qs = wweight.quantize(w, 4, 64, symmetric=True)
    assert qs.zero is None and qs.bits_per_param == pytest.approx(4 + 16 / 64)


def test_scale_dtype_falls_back_to_float32():
    w = _w((256,), 15) * 1e6  # block range exceeds float16
    q = wweight.quantize(w, 4, 64)
    assert q.scale.dtype == torch.float32 and torch.isfinite(q.zero).all()
    assert wweight.error_report(w, q)["sqnr_db"] > 15
    with pytest.raises(ValueError, match="scale_dtype"):
        wweight.quantize(w, 4, 64, scale_dtype=torch.float16)


def test_input_not_modified_and_noncontiguous():
    w = _w((30, 40), 16)
    wt = w.t()
    before = wt.clone()
    q = wweight.quantize(wt, 4, 64, outliers=0.01)
    assert torch.equal(wt, before)
    ref = wweight.quantize(wt.contiguous(), 4, 64, outliers=0.01, backend="reference")
    assert torch.equal(q.codes, ref.codes)
    assert wweight.dequantize(q).shape == (40, 30)


def test_empty_and_scalar():
    q = wweight.quantize(torch.zeros(0, 5), 4, 64)
    assert wweight.dequantize(q).shape == (0, 5)
    q = wweight.quantize(torch.tensor(2.5), 4, "row")
    assert wweight.dequantize(q).shape == () and wweight.dequantize(q).item() == pytest.approx(2.5, abs=1e-3)


def test_to_device_roundtrip():
    q = wweight.quantize(_w((100,), 17), 4, 64, outliers=0.05)
    q2 = q.to("cpu")
    assert torch.equal(wweight.dequantize(q2), wweight.dequantize(q))


def test_save_load_roundtrip(tmp_path):
    sd = {"layer.weight": _w((32, 48), 18, torch.float16), "layer.bias": _w((32,), 19),
          "emb.weight": _w((50, 16), 20, torch.bfloat16), "step": torch.tensor([3])}
    qsd = wweight.quantize_state_dict(sd, 3, 64, outliers=0.01, skip=r"^emb\.",
                                      super_weights={"layer.weight": torch.tensor([[1, 2]])})
    assert isinstance(qsd["layer.weight"], wweight.QuantizedTensor)
    assert qsd["layer.bias"] is sd["layer.bias"] and qsd["emb.weight"] is sd["emb.weight"]
    assert 1 * 48 + 2 in qsd["layer.weight"].outlier_idx.tolist()
    path = tmp_path / "q.safetensors"
    wweight.save_quantized(path, qsd)
    # a valid safetensors file: plain loader sees the documented keys and header metadata
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {"layer.weight::codes", "layer.weight::scale", "layer.weight::zero", "layer.weight::outlier_idx",
            "layer.weight::outlier_val", "layer.bias", "emb.weight", "step"} == keys
    assert meta["wweight.quant.format"] == "1" and "layer.weight" in meta["wweight.quant"]
    back = wweight.load_quantized(path)
    d0 = wweight.dequantize_state_dict(qsd)
    d1 = wweight.dequantize_state_dict(back)
    assert set(d0) == set(d1)
    for k in d0:
        assert torch.equal(d0[k], d1[k]) and d0[k].dtype == d1[k].dtype


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="wweight.quant"):
        wweight.load_quantized(tmp_path / "x.safetensors")


def test_error_report_values():
    w = torch.tensor([1.0, -2.0, 2.0, 0.0])
    q = torch.tensor([1.0, -2.0, 1.0, 0.0])
    r = wweight.error_report(w, q)
    assert r["mse"] == pytest.approx(0.25) and r["max_abs_err"] == 1.0
    assert r["sqnr_db"] == pytest.approx(10 * math.log10(9.0))
    assert r["rel_fro_err"] == pytest.approx(1 / 3)
    assert wweight.error_report(w, w)["sqnr_db"] == math.inf


def test_custom_ops_opcheck():
    w = _w((40, 24), 21)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[3] = True
    torch.library.opcheck(QO._quantize_op, (w.reshape(-1), mask, 2.0, 4, 64, False, -1.0, torch.float16, None),
                          test_utils=("test_schema", "test_faketensor"))
    q = wweight.quantize(w, 4, 64, outliers=0.01)
    torch.library.opcheck(QO._dequantize_op, (q.codes, q.scale, q.zero, q.outlier_idx, q.outlier_val, [40, 24],
                                             torch.float32, 4, 64, None))
    torch.library.opcheck(QO._dq_matmul_op, (torch.randn(3, 24), q.codes, q.scale, q.zero, q.outlier_idx,
                                            q.outlier_val, 40, 24, torch.float32, 4, 64, None))


# ---------------------------------------------------------------- super weights
class _MLP(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, h, bias=False)
        self.up_proj = torch.nn.Linear(d, h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.mlp = _MLP(d, h)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _TinyLM(torch.nn.Module):
    """Llama-shaped module tree (model.layers.{i}.mlp.down_proj) without attention."""

    def __init__(self, vocab=50, d=32, h=64, layers=4):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, d)
        self.model.layers = torch.nn.ModuleList([_Layer(d, h) for _ in range(layers)])

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return x


def test_find_super_weights_planted():
    torch.manual_seed(0)
    m = _TinyLM()
    for p in m.parameters():
        p.data.mul_(0.1)
    layer, row, col = 1, 9, 42
    mlp = m.model.layers[layer].mlp
    m.model.layers[layer].norm.bias.data[0] = 5.0  # a constant input feature ...
    mlp.gate_proj.weight.data[col, 0] = 3.0  # ... makes intermediate channel `col` spike (~225) on every token
    mlp.up_proj.weight.data[col, 0] = 3.0
    mlp.down_proj.weight.data[row, col] = 5.0  # ... and W[row, col] carries it to output `row`
    w_before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.arange(12)[None]
    found = wweight.find_super_weights(m, ids, threshold=50.0)
    assert [(f["layer"], f["row"], f["col"]) for f in found] == [(layer, row, col)]
    assert found[0]["module"] == "model.layers.1.mlp.down_proj" and found[0]["weight"] == 5.0
    assert wweight.find_super_weights(m, ids, threshold=1e9) == []
    found2 = wweight.find_super_weights(m, ids, threshold=50.0, max_iters=3)
    assert (layer, row, col) in [(f["layer"], f["row"], f["col"]) for f in found2]
    for k, v in m.state_dict().items():  # the model is restored
        assert torch.equal(v, w_before[k])
    # the detected coordinates plug straight into quantize
    sw = {f["module"] + ".weight": torch.tensor([[f["row"], f["col"]]]) for f in found}
    qsd = wweight.quantize_state_dict(m.state_dict(), 3, "tensor", super_weights=sw)
    dq = wweight.dequantize_state_dict(qsd)
    assert dq["model.layers.1.mlp.down_proj.weight"][row, col].item() == 5.0


def test_known_super_weights_table():
    sw = Q.known_super_weights("huggyllama/llama-7b")
    assert list(sw) == ["model.layers.2.mlp.down_proj.weight"]
    assert sw["model.layers.2.mlp.down_proj.weight"].tolist() == [[3968, 7003]]
    assert Q.known_super_weights("Mistral-7B-v0.1")["model.layers.1.mlp.down_proj.weight"].tolist() == [[2070, 7310]]
    l3 = Q.known_super_weights("meta-llama/Meta-Llama-3-8B")["model.layers.1.mlp.down_proj.weight"]
    assert l3.tolist() == [[788, 2427], [1384, 2427], [4062, 2427]]
    with pytest.raises(ValueError, match="model_name"):
        Q.known_super_weights("no/such-model")
    with pytest.raises(ValueError, match="not verified"):
        Q.known_super_weights("huggyllama/llama-13b", verified_only=True)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bits=1), ValueError, "bits"),
    (dict(bits=9), ValueError, "bits"),
    (dict(bits=4.0), TypeError, "bits"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=-3), ValueError, "block_size"),
    (dict(block_size="col"), TypeError, "block_size"),
    (dict(outliers=0.0), ValueError, "outliers"),
    (dict(outliers=1.0), ValueError, "outliers"),
    (dict(outliers=-0.1), ValueError, "outliers"),
    (dict(outliers="many"), TypeError, "outliers"),
    (dict(outliers={"zscore": -1}), ValueError, "zscore"),
    (dict(outliers={"topk": 3}), ValueError, "outliers"),
    (dict(outliers=torch.tensor([[4, 0]])), ValueError, "out of range"),
    (dict(outliers=torch.tensor([[0, -1]])), ValueError, "out of range"),
    (dict(outliers=torch.tensor([[0, 1, 2]])), ValueError, "coordinates"),
    (dict(outliers=torch.tensor([[0.0, 1.0]])), TypeError, "integer"),
    (dict(clip=0.0), ValueError, "clip"),
    (dict(clip=1.5), ValueError, "clip"),
    (dict(symmetric=1), TypeError, "symmetric"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        wweight.quantize(torch.ones(4, 5), **kwargs)


def test_bad_weights():
    with pytest.raises(TypeError, match="weight"):
        wweight.quantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        wweight.quantize([1.0, 2.0])
    for bad in (math.nan, math.inf, -math.inf):
        w = torch.arange(8.0)
        w[3] = bad
        # the NaN/Inf may land in the block statistics or among the exact outliers: both are caught
        for outliers in (None, 0.2, {"zscore": 1.0}, torch.tensor([[3]])):
            for sym in (False, True):
                with pytest.raises(ValueError, match="weight contains NaN or Inf"):
                    wweight.quantize(w, 4, 4, symmetric=sym, outliers=outliers)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        wweight.dequantize(torch.ones(3))
    with pytest.raises(ValueError, match="super_weights"):
        wweight.quantize_state_dict({"a": torch.ones(4, 4)}, super_weights={"b": torch.tensor([[0, 0]])})
    with pytest.raises(ValueError, match="out of range"):
        wweight.quantize_state_dict({"a": torch.ones(4, 4)}, super_weights={"a": torch.tensor([[9, 0]])})
    with pytest.raises(ValueError, match="module_pattern"):
        wweight.find_super_weights(torch.nn.Linear(2, 2), torch.zeros(1, 2), module_pattern="nothing")


# ---------------------------------------------------------------- fused dequantize + matmul
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("bits,bs,sym,dtype", [(3, 64, False, torch.float32), (4, "row", True, torch.float32),
                                               (7, 100, False, torch.float16), (2, "tensor", False, torch.bfloat16)])
def test_dequant_matmul_matches_dense(backend, bits, bs, sym, dtype, triton_device):
    dev = triton_device if backend == "triton" else "cpu"
    w = _w((70, 45), 30, dtype)
    w[3, 4] = 20.0  # an exact outlier: the sparse correction must bring it back
    x = _w((2, 3, 45), 31, dtype)
    q = wweight.quantize(w, bits, bs, symmetric=sym, outliers=0.01)
    ref = x.float() @ wweight.dequantize(q, backend="reference").float().t()
    y = Q.dequant_matmul(x.to(dev), q.to(dev), backend=backend)
    assert y.shape == (2, 3, 70) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float().cpu(), ref, rtol=tol, atol=tol)
    b = _w((70,), 32, dtype)
    torch.testing.assert_close(Q.dequant_matmul(x.to(dev), q.to(dev), b.to(dev), backend=backend).float().cpu(),
                               ref + b.float(), rtol=tol, atol=tol)


def test_dequant_matmul_bad_input():
    q = wweight.quantize(_w((8, 16), 33), 4, 64)
    with pytest.raises(ValueError, match="x must have shape"):
        Q.dequant_matmul(torch.ones(3, 15), q)
    with pytest.raises(ValueError, match="2-D"):
        Q.dequant_matmul(torch.ones(3, 16), wweight.quantize(_w((2, 8, 16), 34), 4, 64))
    with pytest.raises(ValueError, match="bias"):
        Q.dequant_matmul(torch.ones(3, 16), q, torch.ones(7))
