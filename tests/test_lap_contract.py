"""wweight.linear_sum_assignment is a drop-in for scipy.optimize.linear_sum_assignment: every case runs through
both, same outcome (same result type and optimal value, or the same exception type and message). Cases follow
scipy's own scipy/optimize/tests/test_linear_assignment.py and the steps of its _lsapmodule.c /
rectangular_lsap.cpp (see wweight/permute/lap_contract.py)."""
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as sp_lsa
from scipy.sparse import random_array

import wweight

inf, nan = np.inf, np.nan


def _outcome(fn, cost, **kw):
    """('ok', row, col, value, kinds) or (exception type, message), with the warnings raised."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            r, c = fn(cost, **kw)
        except Exception as e:  # the comparison is the point: any exception, same type and text
            return (type(e), str(e)), [str(x.message) for x in w]
    return ("ok", r, c), [str(x.message) for x in w]


def _same(cost, value_of=None, **kw):
    """Run scipy and wweight on ``cost``; assert the same outcome. Returns wweight's (r, c) or None."""
    (a, wa), (b, wb) = _outcome(sp_lsa, cost, **kw), _outcome(wweight.linear_sum_assignment, cost, **kw)
    assert wa == wb, (wa, wb)
    if a[0] != "ok" or b[0] != "ok":
        assert a == b, (a, b)
        return None
    (_, r0, c0), (_, r1, c1) = a, b
    assert isinstance(r1, np.ndarray) and isinstance(c1, np.ndarray)
    assert r1.dtype == np.int64 and c1.dtype == np.int64 and r1.shape == r0.shape and c1.shape == c0.shape
    np.testing.assert_array_equal(r1, np.sort(r1))
    c64 = np.asarray(value_of if value_of is not None else cost, dtype=np.float64)
    if c64.size:
        assert math.fsum(c64[r1, c1].tolist()) == math.fsum(c64[r0, c0].tolist())
    return r1, c1


MAXIMIZE = [False, True, 0, 1, "yes", "", None, [], [0], np.bool_(True), np.float64(0.0)]


@pytest.mark.parametrize("maximize", MAXIMIZE, ids=repr)
def test_maximize_any_truthy_value(maximize):
    c = [[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]]
    _same(c, maximize=maximize)
    _same(np.array(c).T, maximize=maximize)


def test_maximize_whose_truth_value_raises_raises_first():
    _same([[1, 2], [3, 4]], maximize=np.array([1, 2]))
    _same("x", maximize=np.array([1, 2]))   # before the cost is converted, as scipy parses arguments first


INPUTS = {
    # scipy's test_linear_sum_assignment_input_shape / _object / _bool / _string / _nan / _neginf / _inf
    "shape_1d": [1, 2, 3],
    "list": [[1, 2, 3], [4, 5, 6]],
    "tuple": ((1, 2, 3), (4, 5, 6)),
    "matrix": np.matrix([[1, 2, 3], [4, 5, 6]]),
    "bool": np.identity(3).astype(np.bool_),
    "string_array": np.identity(3).astype(str),
    "nan": np.diag([nan, 1, 1]),
    "neginf": np.diag([1, -inf, 1]),
    "inf_column": np.where(np.arange(3) == 0, inf, np.identity(3)),
    # numpy's conversion under scipy's PyArray_ContiguousFromAny(..., NPY_DOUBLE): lists element-wise,
    # arrays with the safe casting rule
    "numeric_strings": [["1", "2"], ["3", "4"]],
    "bad_string": [["a", "2"], ["3", "4"]],
    "scalar_string": "x",
    "ragged": [[1, 2], [3]],
    "complex_list": [[1j, 2], [3, 4]],
    "complex_array": np.array([[1j, 2], [3, 4]]),
    "object_array": np.array([[1, "a"]], dtype=object),
    "object_numbers": np.array([[1, 2], [3, 4]], dtype=object),
    "longdouble": np.ones((2, 2), dtype=np.longdouble),
    "datetime": np.array([[1, 2]], dtype="datetime64[s]"),
    "dict": {"a": 1},
    "none": None,
    "scalar": 3.0,
    "empty_list": [],
    "empty_row": [[]],
    "bytes": [[b"1", b"2"]],
    "big_int": [[2 ** 70, 1], [1, 1]],
    "memoryview": memoryview(np.arange(6.0).reshape(2, 3)),
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4) ** 1.5),
    "strided": np.arange(48.0).reshape(6, 8)[::2, ::3] % 7,
    "big_endian": (np.arange(9.0).reshape(3, 3) % 4).astype(">f8"),
    "readonly": np.broadcast_to(np.arange(4.0), (3, 4)),
    "all_inf_row": [[inf, inf], [1, 1]],
    "all_neginf_row": [[-inf, -inf], [1, 1]],
    "tall_inf_row_ok": [[inf, inf], [1, 2], [3, 1]],
    "tall_infeasible": [[inf, 1], [inf, 2], [inf, 3]],
    "mixed_inf": [[inf, 2, -inf], [1, inf, 3]],
    "nan_and_inf": [[nan, inf], [1, 1]],
}
for dt in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
           np.uint32, np.uint64):
    INPUTS[f"dtype_{np.dtype(dt).name}"] = (np.arange(20).reshape(4, 5) * 7 % 11).astype(dt)


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("maximize", [False, True])
def test_inputs_like_scipy(name, maximize):
    _same(INPUTS[name], maximize=maximize)


@pytest.mark.parametrize("shape", [(0, 0), (2, 0), (0, 3), (1, 1), (1, 5), (5, 1), (1, 0)])
def test_empty_and_thin(shape):
    rng = np.random.default_rng(sum(shape))
    c = rng.random(shape)
    out = _same(c)
    _same(c, maximize=True)
    if 0 in shape:
        assert len(out[0]) == 0 and len(out[1]) == 0


def test_constant_cost_matrix_identity():
    """scipy #11602: a constant matrix gives the identity (scipy's test_constant_cost_matrix)."""
    r, c = wweight.linear_sum_assignment(np.ones((8, 8)))
    np.testing.assert_array_equal(r, np.arange(8))
    np.testing.assert_array_equal(c, np.arange(8))


# scipy.sparse.csgraph.tests.test_matching.linear_sum_assignment_test_cases (used by scipy's
# test_linear_sum_assignment_small_inputs) with their expected costs
SMALL = [
    ([[400, 150, 400], [400, 450, 600], [300, 225, 300]], [150, 400, 300]),
    ([[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]], [150, 2, 300]),
    ([[10, 10, 8], [9, 8, 1], [9, 7, 4]], [10, 1, 7]),
    ([[10, 10, 8, 11], [9, 8, 1, 1], [9, 7, 4, 10]], [10, 1, 4]),
    ([[10, inf, inf], [inf, inf, 1], [inf, 7, inf]], [10, 1, 7]),
]


@pytest.mark.parametrize("sign,case", list(itertools.product([-1, 1], SMALL)))
def test_small_inputs(sign, case):
    cost, expected = case
    maximize = sign == -1
    cost = sign * np.array(cost)
    expected = sign * np.array(expected)
    r, c = wweight.linear_sum_assignment(cost, maximize=maximize)
    np.testing.assert_array_equal(r, np.sort(r))
    np.testing.assert_array_equal(expected, cost[r, c])
    cost = cost.T
    r, c = wweight.linear_sum_assignment(cost, maximize=maximize)
    np.testing.assert_array_equal(r, np.sort(r))
    np.testing.assert_array_equal(np.sort(expected), np.sort(cost[r, c]))
    _same(cost, maximize=maximize)


def test_many_sparse_inputs_feasible_or_not():
    """scipy's test_two_methods_give_same_result_on_many_sparse_inputs, here against scipy itself: 100 cases of
    100x100 with ~94% forbidden entries, ~36 infeasible; same raise / same optimal cost, every solver path."""
    rng = np.random.default_rng(12342309)
    infeasible = 0
    for _ in range(100):
        sparse = random_array((100, 100), density=0.06, data_sampler=lambda size: rng.integers(1, 100, size))
        dense = np.full(sparse.shape, np.inf)
        dense[sparse.row, sparse.col] = sparse.data
        infeasible += _same(dense) is None
        _same(-dense, maximize=True)
    assert 20 < infeasible < 60


def test_torch_in_torch_out_any_real_dtype():
    """Torch tensors (any real / bool dtype, requires_grad too) give torch int64 results on their device, with
    scipy's optimal value; scipy itself refuses bf16 and requires-grad tensors, wweight takes them."""
    base = np.arange(30).reshape(5, 6) * 13 % 17
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
               torch.int64, torch.uint8, torch.bool):
        t = torch.from_numpy(base).to(dt)
        ref = t.to(torch.float64).numpy()
        for mx in (False, True):
            r, c = wweight.linear_sum_assignment(t, maximize=mx)
            assert isinstance(r, torch.Tensor) and r.dtype == torch.int64 and c.dtype == torch.int64
            assert r.device == t.device
            r0, c0 = sp_lsa(ref, maximize=mx)
            assert math.fsum(ref[r.numpy(), c.numpy()].tolist()) == math.fsum(ref[r0, c0].tolist())
    g = torch.rand(4, 4, requires_grad=True)
    r, c = wweight.linear_sum_assignment(g)
    assert torch.equal(c, torch.from_numpy(sp_lsa(g.detach().numpy())[1]))


def test_torch_errors_like_numpy():
    """Tensors raise scipy's messages for the same contents; complex tensors are cast as scipy casts a CPU
    complex tensor (real part, ComplexWarning)."""
    for arr in (np.diag([nan, 1.0, 1.0]), np.diag([1.0, -inf, 1.0]), INPUTS["inf_column"], np.zeros(3),
                np.zeros((2, 2, 2, 2)), np.zeros(())):
        for mx in (False, True):
            a, _ = _outcome(sp_lsa, arr, maximize=mx)
            b, _ = _outcome(wweight.linear_sum_assignment, torch.from_numpy(arr), maximize=mx)
            if a[0] == "ok":  # same optimal value; among tied optima (diag with -inf) any one is scipy's contract
                assert b[0] == "ok" and a[1].tolist() == b[1].tolist(), (arr, mx)
                ra, ca = a[1:]
                rb, cb = (x.numpy() for x in b[1:])
                assert sorted(cb.tolist()) == sorted(set(cb.tolist())) and len(cb) == len(ca)
                assert math.fsum(arr[ra, ca].tolist()) == math.fsum(arr[rb, cb].tolist()), (arr, mx)
            else:
                assert a == b, (arr, mx)
    z = torch.tensor([[1 + 5j, 2], [3, 4 - 9j]], dtype=torch.complex64)
    (a, wa), (b, wb) = _outcome(sp_lsa, z), _outcome(wweight.linear_sum_assignment, z)
    assert wa == wb and [x.tolist() for x in a[1:]] == [x.tolist() for x in b[1:]]


def test_tall_and_wide_forbidden_match_scipy_exactly():
    """On the scipy path (CPU default without the C++ solver) the assignment itself is scipy's."""
    rng = np.random.default_rng(5)
    for shape in ((7, 12), (12, 7), (9, 9)):
        for _ in range(20):
            c = rng.integers(0, 5, shape).astype(np.float64)
            c[rng.random(shape) < 0.3] = inf
            for mx in (False, True):
                _same(-c if mx else c, maximize=mx)


def test_batch_contract():
    """(B, n, m): (B, k) results like scipy per problem; an infeasible / invalid problem is named by index."""
    rng = np.random.default_rng(6)
    c = rng.random((5, 6, 4))
    r, cc = wweight.linear_sum_assignment(c)
    assert isinstance(r, np.ndarray) and r.shape == (5, 4) and cc.shape == (5, 4)
    for b in range(5):
        r0, c0 = sp_lsa(c[b])
        np.testing.assert_array_equal(r[b], r0)
        assert math.fsum(c[b][r[b], cc[b]].tolist()) == math.fsum(c[b][r0, c0].tolist())
    c[3, :, 1:] = inf
    with pytest.raises(ValueError, match=r"^cost matrix is infeasible \(batch index 3\)$"):
        wweight.linear_sum_assignment(c)
    c[3] = 0
    c[2, 0, 0] = nan
    with pytest.raises(ValueError, match=r"^matrix contains invalid numeric entries \(batch index 2\)$"):
        wweight.linear_sum_assignment(c)
    c[2, 0, 0] = -inf
    with pytest.raises(ValueError, match=r"invalid numeric entries \(batch index 2\)"):
        wweight.linear_sum_assignment(c)
    r, cc = wweight.linear_sum_assignment(c, maximize=True)   # -inf is a forbidden pair when maximising
    assert (cc[2][r[2] == 0] != 0).all()
    e = wweight.linear_sum_assignment(np.zeros((0, 3, 3)))
    assert e[0].shape == (0, 3)
    t = torch.rand(3, 4, 5)
    r, cc = wweight.linear_sum_assignment(t)
    assert isinstance(r, torch.Tensor) and r.shape == (3, 4)


def test_keyword_name_cost_matrix():
    c = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    r, cc = wweight.linear_sum_assignment(cost_matrix=c)
    np.testing.assert_array_equal(cc, sp_lsa(cost_matrix=c)[1])
    np.testing.assert_array_equal(cc, [1, 0, 2])   # scipy's docstring example
