"""Issue 14: mergekit / PEFT habits of the Python API, and bad input refused naming the argument.

``lambda`` / ``int8_mask`` spelled as mergekit does, task vectors with ``base=None`` (PEFT),
``weights`` refused by the isotropic methods, every method on 0-d and one-element tensors,
super-weight coordinates of another architecture, weight-matching / LAP argument checks."""
import inspect

import numpy as np
import pytest
import torch

import wweight
from wweight import methods as M

TA = [m for m in wweight.MERGE_METHODS if M.get(m).needs_base]


def _method_args(method, ts, **ta_kw):
    """(tensors, kwargs) a method takes: the sparse family ``ta_kw``; mergekit's other methods
    (interp) as many models as they take and their required ``t``."""
    m = M.get(method)
    if m.family == "iso":
        return ts, {}
    if m.family == "interp":
        return (ts[:m.max_models] if m.max_models else ts), ({"t": 0.5} if "t" in m.names() else {})
    return ts, ta_kw


def _models(shape=(6, 5), K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(K)]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_lambda_spelled_as_mergekit(method):
    base, ts = _models()
    kw = dict(density=0.5, seed=1)
    want = wweight.merge_tensors(method, base, ts, lambda_=0.5, **kw)
    got = wweight.merge_tensors(method, base, ts, **{"lambda": 0.5}, **kw)
    assert torch.equal(got, want)
    assert not torch.equal(want, wweight.merge_tensors(method, base, ts, **kw))
    with pytest.raises(TypeError, match=r"lambda_ or lambda"):
        wweight.merge_tensors(method, base, ts, lambda_=0.5, **{"lambda": 0.5})


@pytest.mark.parametrize("method", wweight.MERGE_METHODS)
def test_int8_mask_accepted_without_numeric_effect(method):
    base, ts = _models()
    ts, kw = _method_args(method, ts, seed=3, density=0.5)
    want = wweight.merge_tensors(method, base, ts, **kw)
    assert torch.equal(wweight.merge_tensors(method, base, ts, int8_mask=True, **kw), want)
    with pytest.raises(TypeError, match="int8_mask"):
        wweight.merge_tensors(method, base, ts, int8_mask="yes")
    sd = wweight.merge_state_dicts(method, {"w": base}, [{"w": t} for t in ts], int8_mask=True, **kw)
    assert sd["w"].shape == base.shape


@pytest.mark.parametrize("method", [m for m in TA if M.get(m).family == "sparse"])
def test_task_vectors_with_base_none_as_peft(method):
    base, ts = _models()
    deltas = [t - base for t in ts]
    kw = dict(weights=[1.0, 0.5, 0.7], density=0.6, seed=2)
    got = wweight.merge_tensors(method, None, deltas, **kw)
    want = wweight.merge_tensors(method, torch.zeros_like(base), deltas, **kw)
    assert torch.equal(got, want)
    # and it is the merged delta of the full models (up to the rounding of base + delta)
    full = wweight.merge_tensors(method, base, ts, **kw)
    torch.testing.assert_close(got, full - base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m"])
def test_iso_methods_refuse_weights(method):
    base, ts = _models()
    with pytest.raises(ValueError, match=rf"weights are not used by {method}"):
        wweight.merge_tensors(method, base, ts, weights=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="lambda"):
        wweight.merge_tensors(method, base, ts, lambda_=0.5)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("method", wweight.MERGE_METHODS)
def test_every_method_on_0d_and_one_element(method, shape):
    base = torch.zeros(shape)
    ts, kw = _method_args(method, [torch.full(shape, 0.3), torch.full(shape, -0.2)], density=0.5, seed=0)
    out = wweight.merge_tensors(method, base, ts, **kw)
    assert out.shape == base.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("x", [torch.tensor(0.3), torch.tensor([0.3]), torch.tensor([[0.3]])])
def test_della_magprune_0d_and_one_element(x):
    out = wweight.sparsify(x, 0.5, "della_magprune", seed=0)
    # one element: rank_norm 0, so keep probability density - epsilon; as a 1x1 row
    want = wweight.sparsify(x.reshape(1, 1), 0.5, "della_magprune", seed=0).reshape(x.shape)
    assert out.shape == x.shape and torch.equal(out, want)
    # mergekit 0.1.5 fails on these inputs (0-d: IndexError; one element: NaN probabilities)
    mk = pytest.importorskip("mergekit.sparsify")
    with pytest.raises((IndexError, RuntimeError)):
        mk.sparsify(x, 0.5, mk.SparsificationMethod.della_magprune, epsilon=0.15)


def test_sparsify_defaults_documented_against_mergekit():
    sig = inspect.signature(wweight.sparsify)
    assert sig.parameters["gamma"].default == 0.01 and sig.parameters["epsilon"].default == 0.15
    doc = wweight.sparsify.__doc__
    assert "mergekit.sparsify.sparsify" in doc and "gamma=0, epsilon=0" in doc
    mk = pytest.importorskip("mergekit.sparsify")
    msig = inspect.signature(mk.sparsify)
    assert msig.parameters["gamma"].default == 0 and msig.parameters["epsilon"].default == 0
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    got = wweight.sparsify(x, 0.5, "magnitude_outliers", gamma=0, epsilon=0)
    want = mk.sparsify(x, 0.5, mk.SparsificationMethod.magnitude_outliers)
    assert torch.equal(got, want)


def test_known_super_weights_on_another_architecture():
    name = "model.layers.2.mlp.down_proj.weight"
    small = {name: torch.randn(64, 32)}
    with pytest.raises(ValueError, match="another architecture"):
        wweight.known_super_weights("huggyllama/llama-7b", state_dict=small)
    sw = wweight.known_super_weights("huggyllama/llama-7b")
    with pytest.raises(ValueError, match="another architecture"):
        wweight.quantize_state_dict(small, 4, 64, super_weights=sw)
    with pytest.raises(ValueError, match="another architecture"):
        wweight.quantize_state_dict({"other.weight": torch.randn(4, 4)}, 4, 64, super_weights=sw)
    ok = {name: torch.empty(4096, 11008, device="meta")}
    assert torch.equal(wweight.known_super_weights("huggyllama/llama-7b", state_dict=ok)[name],
                       torch.tensor([[3968, 7003]]))


def _mlp():
    spec = wweight.mlp_spec(["0", "1"])
    g = torch.Generator().manual_seed(0)
    a = {"0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.randn(8, generator=g),
         "1.weight": torch.randn(3, 8, generator=g), "1.bias": torch.randn(3, generator=g)}
    return spec, a, {k: torch.randn(v.shape, generator=g) for k, v in a.items()}


@pytest.mark.parametrize("kw, err, pattern", [
    ({"cost_dtype": torch.int32}, TypeError, "cost_dtype must be a floating"),
    ({"cost_dtype": torch.int64}, TypeError, "cost_dtype must be a floating"),
    ({"cost_dtype": "float32"}, TypeError, "cost_dtype"),
    ({"tol": None}, TypeError, "tol must be a number"),
    ({"tol": "x"}, TypeError, "tol must be a number"),
    ({"tol": -1.0}, ValueError, "tol must be >= 0"),
    ({"tol": float("nan")}, ValueError, "tol must be finite"),
])
def test_weight_matching_argument_checks(kw, err, pattern):
    spec, a, b = _mlp()
    with pytest.raises(err, match=pattern):
        wweight.weight_matching(spec, a, b, **kw)
    assert set(wweight.weight_matching(spec, a, b, cost_dtype=torch.float64, tol=0)) == {"P0"}


@pytest.mark.parametrize("args, kw, err, pattern", [
    # scipy.optimize.linear_sum_assignment's exception types and messages (a drop-in; tests/test_lap_contract.py)
    (("x",), {}, ValueError, "could not convert string to float: 'x'"),
    ((torch.randn(3),), {}, ValueError, r"expected a matrix \(2-D array\), got a 1 array"),
    ((torch.randn(3, 3),), {"maximize": np.array([1, 2])}, ValueError, "truth value of an array"),
    ((torch.randn(3, 3),), {"method": None}, ValueError, "method must be one of"),
    ((torch.empty(3, 3, device="meta"),), {}, ValueError, "cost_matrix is a meta tensor"),
    ((np.array([[1, "a"]], dtype=object),), {}, TypeError, r"Cannot cast array data from dtype\('O'\)"),
])
def test_linear_sum_assignment_bad_inputs_name_the_argument(args, kw, err, pattern):
    with pytest.raises(err, match=pattern):
        wweight.linear_sum_assignment(*args, **kw)
