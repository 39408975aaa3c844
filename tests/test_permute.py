"""PermutationSpec validation, apply_permutation and weight_matching (Git Re-Basin)."""
import pytest
import torch

from wweight.permute import PermutationSpec, apply_permutation, random_permutation, weight_matching
from wweight.permute.specs import mlp_spec
from wweight.reference.permute import apply_permutation_reference, weight_matching_reference


def _mlp_params(sizes=(8, 32, 16, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(len(sizes) - 1):
        sd[f"{2 * i}.weight"] = torch.randn(sizes[i + 1], sizes[i], generator=g, dtype=dtype)
        sd[f"{2 * i}.bias"] = torch.randn(sizes[i + 1], generator=g, dtype=dtype)
    return sd


def _heads_spec_params(H=3, d=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"qkv": torch.randn(D, 3 * H * d, generator=g), "qkv_b": torch.randn(3 * H * d, generator=g),
          "proj": torch.randn(H * d, D, generator=g), "gq": torch.randn(2 * 3 * d, D, generator=g)}
    spec = PermutationSpec({
        "qkv": (None, [("Ph", "Pqk"), ("Ph", "Pqk"), ("Ph", "Pv")]),
        "qkv_b": ([("Ph", "Pqk"), ("Ph", "Pqk"), ("Ph", "Pv")],),
        "proj": (("Ph", "Pv"), None),
        "gq": (("Pg", "Pr", None), None),
    }, sizes={"Ph": H, "Pqk": d, "Pv": d, "Pg": 2, "Pr": 3})
    return spec, sd


# ------------------------------------------------------------------------------ spec


def test_perm_to_axes_and_shapes():
    spec = mlp_spec(["0", "2", "4"])
    assert spec.perm_to_axes["P0"] == [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]
    assert spec.perm_shapes(_mlp_params()) == {"P0": (32,), "P1": (16,)}
    spec, sd = _heads_spec_params()
    assert spec.perm_shapes(sd) == {"Ph": (3,), "Pqk": (3, 4), "Pv": (3, 4), "Pg": (2,), "Pr": (2, 3)}


def test_spec_errors_name_the_problem():
    sd = _mlp_params()
    with pytest.raises(ValueError, match="'9.weight'"):
        PermutationSpec({"9.weight": ("P0", None)}).validate(sd)
    with pytest.raises(ValueError, match="'0.weight'.*2 axes"):
        PermutationSpec({"0.weight": ("P0",)}).validate(sd)
    with pytest.raises(ValueError, match="'P0'.*different sizes"):
        PermutationSpec({"0.weight": ("P0", None), "2.weight": ("P0", None)}).validate(sd)
    with pytest.raises(ValueError, match="size of permutation 'Ph'"):
        PermutationSpec({"0.weight": (("Ph", "Pd"), None)}).validate(sd)
    with pytest.raises(ValueError, match="covers"):
        PermutationSpec({"0.weight": (("Ph", "Pd"), None)}, sizes={"Ph": 4, "Pd": 5}).validate(sd)
    with pytest.raises(TypeError, match="axis 1"):
        PermutationSpec({"0.weight": ("P0", 3)})
    with pytest.raises(TypeError, match="tuple with one entry per axis"):
        PermutationSpec({"0.weight": "P0"})
    with pytest.raises(ValueError, match="None may only be the last"):
        PermutationSpec({"0.weight": ((None, "P"), None)})
    with pytest.raises(ValueError, match="sizes names perm 'Q'"):
        PermutationSpec({"0.weight": ("P0", None)}, sizes={"Q": 3})


def test_bad_perms_rejected():
    spec = mlp_spec(["0", "2", "4"])
    sd = _mlp_params()
    good = random_permutation(spec, sd)
    with pytest.raises(ValueError, match="'P1'"):
        apply_permutation(spec, {"P0": good["P0"]}, sd)
    with pytest.raises(ValueError, match=r"perms\['P0'\] has shape \(31,\)"):
        apply_permutation(spec, {**good, "P0": good["P0"][:31]}, sd)
    dup = good["P0"].clone()
    dup[0] = dup[1]
    with pytest.raises(ValueError, match="'P0'.*not a permutation"):
        apply_permutation(spec, {**good, "P0": dup}, sd)
    with pytest.raises(TypeError, match="integer"):
        apply_permutation(spec, {**good, "P0": good["P0"].float()}, sd)
    with pytest.raises(ValueError, match="does not use"):
        apply_permutation(spec, {**good, "P7": good["P0"]}, sd)
    with pytest.raises(ValueError, match="init_perm"):
        weight_matching(spec, sd, sd, init_perm={**good, "P0": dup})


def test_weight_matching_bad_params():
    spec = mlp_spec(["0", "2", "4"])
    a = _mlp_params()
    b = dict(a)
    b["2.weight"] = torch.randn(16, 31)
    with pytest.raises(ValueError, match="params_b.*'2.weight'"):
        weight_matching(spec, a, b)
    b = {k: v for k, v in a.items() if k != "4.bias"}
    with pytest.raises(ValueError, match="params_b has no parameter '4.bias'"):
        weight_matching(spec, a, b)
    b = dict(a)
    b["0.bias"] = a["0.bias"].clone()
    b["0.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="'0.bias'.*NaN"):
        weight_matching(spec, a, b)
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(spec, a, a, max_iter=-1)


# ------------------------------------------------------------------------------ apply


def test_apply_matches_elementwise_reference_and_keeps_inputs():
    spec, sd = _heads_spec_params()
    sd["untouched"] = torch.randn(3)
    perms = random_permutation(spec, sd, seed=5)
    before = {k: v.clone() for k, v in sd.items()}
    out = apply_permutation(spec, perms, sd)
    ref = apply_permutation_reference(spec, perms, sd)
    for k in sd:
        assert torch.equal(out[k], ref[k]), k
        assert torch.equal(sd[k], before[k])
    assert out["untouched"] is sd["untouched"]


def test_apply_preserves_mlp_function():
    spec = mlp_spec(["0", "2", "4"])
    sd = _mlp_params()
    perms = random_permutation(spec, sd, seed=1)
    out = apply_permutation(spec, perms, sd)

    def f(p, x):
        h = torch.relu(x @ p["0.weight"].T + p["0.bias"])
        h = torch.relu(h @ p["2.weight"].T + p["2.bias"])
        return h @ p["4.weight"].T + p["4.bias"]

    x = torch.randn(5, 8)
    assert not torch.equal(out["0.weight"], sd["0.weight"])
    torch.testing.assert_close(f(out, x), f(sd, x))


# ------------------------------------------------------------------------------ matching


def test_weight_matching_equals_reference_port():
    """Same perms as the line-by-line Git Re-Basin port (same seed, so the same visiting order)."""
    spec = mlp_spec(["0", "2", "4", "6"])
    a = _mlp_params((8, 24, 20, 12, 3), seed=0, dtype=torch.float64)
    b = _mlp_params((8, 24, 20, 12, 3), seed=1, dtype=torch.float64)
    for seed in (0, 3):
        got = weight_matching(spec, a, b, seed=seed)
        ref = weight_matching_reference(spec, a, b, seed=seed)
        for p in ref:
            assert torch.equal(got[p], ref[p]), (seed, p)


def test_planted_permutation_recovered_nested():
    spec, sd = _heads_spec_params(H=4, d=5, D=7, seed=3)
    planted = random_permutation(spec, sd, seed=11)
    b = apply_permutation(spec, planted, sd)
    perms = weight_matching(spec, sd, b)
    back = apply_permutation(spec, perms, b)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_history_callback_and_monotone_objective():
    spec = mlp_spec(["0", "2", "4"])
    a, b = _mlp_params(seed=0), _mlp_params(seed=1)
    hist = []
    weight_matching(spec, a, b, callback=hist.append)
    assert hist and {"iteration", "perm", "old", "new", "improved"} <= set(hist[0])
    assert all(h["new"] >= h["old"] - 1e-6 * abs(h["old"]) for h in hist)
    last_round = [h for h in hist if h["iteration"] == hist[-1]["iteration"]]
    assert not any(h["improved"] for h in last_round)
    # max_iter=0: identity
    ident = weight_matching(spec, a, b, max_iter=0)
    assert torch.equal(ident["P0"], torch.arange(32))


def test_init_perm_at_optimum_is_kept():
    spec = mlp_spec(["0", "2", "4"])
    a = _mlp_params(seed=0)
    planted = random_permutation(spec, a, seed=2)
    b = apply_permutation(spec, planted, a)
    p1 = weight_matching(spec, a, b)
    hist = []
    p2 = weight_matching(spec, a, b, init_perm=p1, callback=hist.append)
    assert max(h["iteration"] for h in hist) == 0
    for p in p1:
        assert torch.equal(p1[p], p2[p])


def test_weight_matching_with_auction_lap():
    """The GPU LAP path (forced on CPU) inside weight matching gives the same perms as scipy."""
    spec, sd = _heads_spec_params(H=4, d=5, D=7, seed=4)
    _, other = _heads_spec_params(H=4, d=5, D=7, seed=5)
    import wweight.backends.torch.permute as lap

    p_scipy = weight_matching(spec, sd, other, seed=1, lap_method="scipy")
    before = dict(lap.stats)
    p_auc = weight_matching(spec, sd, other, seed=1, lap_method="auction")
    assert lap.stats["rounds"] > before["rounds"] and lap.stats["fallbacks"] == before["fallbacks"]
    for p in p_scipy:
        assert torch.equal(p_scipy[p], p_auc[p]), p
