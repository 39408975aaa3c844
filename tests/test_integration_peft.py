"""wweight.integrations.peft: PEFT's merge utilities on wweight's ops give PEFT's numbers, bit for bit.

Every comparison is against PEFT's own functions, captured before ``install()``: random stacks (K = 2..5,
float32/bfloat16/float16, odd and 0-d shapes, tied magnitudes, densities 0..1, both sign methods, negative
and zero weights), PEFT's own test cases for the merge utilities (its tests/test_merge_utils.py and
tests/test_negative_weights.py, rewritten here), and ``LoraModel.add_weighted_adapter`` end to end.
"""
import contextlib
import random
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("peft")

import peft.tuners.lora.model as lora_model  # noqa: E402
import peft.utils.merge_utils as mu  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from wweight.integrations import peft as wp  # noqa: E402

ORIG = {name: getattr(mu, name) for name in wp.PATCHED}   # PEFT's functions, before any install()
LORA_NAMES = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bits (signed zeros and NaN payloads included)."""
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    iv = INT_VIEW.get(got.dtype)
    if iv is None:
        assert torch.equal(got, want), what
    elif not torch.equal(got.contiguous().view(iv), want.contiguous().view(iv)):
        diff = (got.double() - want.double()).abs().nan_to_num(float("inf"))
        raise AssertionError(f"{what}: {int((got.view(iv) != want.view(iv)).sum())} elements differ, "
                             f"max |diff| {float(diff.max())}")


@contextlib.contextmanager
def peft_code():
    """PEFT's own code runs inside (install() lifted): PEFT's functions look each other up as globals of
    merge_utils (ties -> prune -> magnitude_based_pruning), so calling ORIG[...] while installed would
    run the wrappers underneath -- every reference value is computed in here."""
    was = wp.installed()
    wp.uninstall()
    try:
        yield
    finally:
        if was:
            wp.install(min_numel=0)


@pytest.fixture
def installed():
    """install() with every tensor sent to wweight; one thread (tiny tensors, a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wp.stats.clear()
    wp.install(min_numel=0)
    try:
        yield
    finally:
        wp.uninstall()
        torch.set_num_threads(threads)


def _case(seed: int):
    rng = random.Random(seed)
    K = rng.randint(2, 5)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    shape = rng.choice([(), (1,), (7,), (13, 17), (3, 5, 7), (64, 33), (8, 1, 9)])
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g) * rng.choice([1e-3, 1.0, 30.0]) for _ in range(K)]
    kind = rng.random()
    if kind < 0.3:       # many ties at every magnitude, zeros included
        ts = [(t * 2).round() / 2 for t in ts]
    elif kind < 0.4:     # one all-zero task (a fresh LoRA B), the rest tied
        ts[0] = torch.zeros(shape)
    ts = [t.to(dtype) for t in ts]
    w = torch.tensor([rng.choice([1.0, 0.5, -0.7, 0.0, rng.uniform(-2, 2)]) for _ in range(K)])
    if rng.random() < 0.15:
        w = w.to(dtype)  # a 16-bit result: PEFT's expression runs (asserted equal all the same)
    density = rng.choice([0.0, 0.01, 0.1, 0.25, 0.5, 0.8, 0.999, 1.0])
    return ts, w, density


def _calls(ts, w, density):
    yield "task_arithmetic", (ts, w), {}
    yield "magnitude_prune", (ts, w, density), {}
    yield "dare_linear", (ts, w, density), {}
    for name in ("ties", "dare_ties"):
        for method in ("total", "frequency"):
            yield name, (ts, w, density), {"majority_sign_method": method}


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("block", range(4))
def test_random_stacks_bit_identical(installed, block):
    """60 stacks per block x 7 calls: every installed function gives PEFT's bits and RNG consumption."""
    cases = [(seed, *_case(seed)) for seed in range(block * 60, block * 60 + 60)]
    wants = {}
    with peft_code():
        for seed, ts, w, density in cases:
            for i, (name, args, kw) in enumerate(_calls(ts, w, density)):
                torch.manual_seed(seed)
                wants[seed, i] = ORIG[name](*args, **kw), torch.get_rng_state()
    for seed, ts, w, density in cases:
        before = [t.clone() for t in ts]
        for i, (name, args, kw) in enumerate(_calls(ts, w, density)):
            want, state_want = wants[seed, i]
            torch.manual_seed(seed)
            got = getattr(mu, name)(*args, **kw)
            assert_bits(got, want, f"seed {seed} {name} {kw} K={len(ts)} {ts[0].dtype} {tuple(ts[0].shape)} "
                                   f"density={density}")
            assert torch.equal(torch.get_rng_state(), state_want), f"{name}: RNG consumption changed"
        for t, b in zip(ts, before):
            assert_bits(t, b, "an input was modified")
    # the wweight paths did run (the test would pass vacuously if everything fell back to PEFT)
    for key in ("magnitude_wweight", "sum_wweight", "disjoint_wweight", "magnitude_peft", "sum_peft"):
        assert wp.stats.get(key, 0) > 0, (key, wp.stats)


def test_magnitude_prune_paths(installed):
    """Untied cut and t == 0 run on wweight; a tie at a nonzero cut runs torch.topk (PEFT's original)."""
    x = torch.tensor([3.0, -1.0, 2.0, -4.0, 0.5, -0.0, 0.0, 6.0])
    for d, path in ((0.5, "magnitude_wweight"), (0.9, "magnitude_wweight")):  # k=4 untied; k=7: t == 0
        with peft_code():
            want = ORIG["prune"](x, d, "magnitude")
        wp.stats.clear()
        assert_bits(mu.prune(x, d, "magnitude"), want, f"density {d}")
        assert wp.stats == {path: 1}
    tied = torch.tensor([1.0, -2.0, 2.0, 2.0, -0.5])
    wp.stats.clear()
    assert_bits(mu.magnitude_based_pruning(tied, 0.4), ORIG["magnitude_based_pruning"](tied, 0.4))
    assert wp.stats == {"magnitude_peft": 1}
    nan = torch.tensor([1.0, float("nan"), 3.0, -2.0])
    with peft_code():
        want = ORIG["prune"](nan, 0.5, "magnitude")
    assert_bits(mu.prune(nan, 0.5, "magnitude"), want)
    with pytest.raises(ValueError, match="Density should be >= 0"):
        mu.prune(x, -0.1, "magnitude")
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        assert mu.prune(x, 1.0, "magnitude") is x     # PEFT returns the input object itself


def test_large_tensors_bit_identical(installed):
    """Tensors past the vectorised chunks (528k elements, K = 4), fp32 and bf16."""
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        ts = [torch.randn(512, 1031, generator=g).to(dtype) for _ in range(4)]
        w = torch.tensor([0.9, -0.3, 0.45, 1.2])
        for name, args, kw in (("task_arithmetic", (ts, w), {}), ("ties", (ts, w, 0.2), {}),
                               ("magnitude_prune", (ts, w, 0.3), {})):
            with peft_code():
                want = ORIG[name](*args, **kw)
            assert_bits(getattr(mu, name)(*args, **kw), want, f"{name} {dtype}")


def test_install_uninstall_restore_originals():
    assert not wp.installed()
    assert all(getattr(lora_model, n) is ORIG[n] for n in LORA_NAMES)
    wp.install()
    wp.install(min_numel=0)                    # idempotent: only the settings change
    assert wp.installed()
    for n in wp.PATCHED:
        assert getattr(mu, n) is getattr(wp, n) and getattr(mu, n) is not ORIG[n]
    for n in LORA_NAMES:                       # lora/model.py imported them by name at its top
        assert getattr(lora_model, n) is getattr(wp, n)
    assert wp.originals() == ORIG
    wp.uninstall()
    wp.uninstall()
    assert not wp.installed()
    for n in wp.PATCHED:
        assert getattr(mu, n) is ORIG[n]
    for n in LORA_NAMES:
        assert getattr(lora_model, n) is ORIG[n]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="backend"):
        wp.install(backend="gpu")
    with pytest.raises(ValueError, match="min_numel"):
        wp.install(min_numel=-1)
    assert not wp.installed()


def test_default_min_numel_leaves_small_tensors_to_peft():
    wp.install()
    try:
        wp.stats.clear()
        ts = [torch.randn(8, 16) for _ in range(3)]
        w = torch.tensor([0.5, 0.3, 0.2])
        got = mu.ties(ts, w, 0.5)
        with peft_code():
            want = ORIG["ties"](ts, w, 0.5)
        assert_bits(got, want)
        assert not any(k.endswith("_wweight") for k in wp.stats), wp.stats
    finally:
        wp.uninstall()


def test_importing_wweight_does_not_import_peft():
    code = ("import sys, wweight, wweight.integrations; "
            "assert 'peft' not in sys.modules, 'peft imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd="/")  # not the checkout, whose source tree `python -c` would import
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------ PEFT's own test cases
# (tests/test_merge_utils.py of huggingface/peft, as ours: against the originals, since PEFT 0.21.2's
# DARE still divides 0 by 0 at density 0 -- the wrapper must reproduce that NaN, not fix it)

PEFT_METHODS = {
    "ties": lambda f, t, w, d: f["ties"](t, w, d),
    "dare_linear": lambda f, t, w, d: f["dare_linear"](t, w, d),
    "dare_ties": lambda f, t, w, d: f["dare_ties"](t, w, d),
    "magnitude_prune": lambda f, t, w, d: f["magnitude_prune"](t, w, d),
}


def _peft_fixture():
    tensor = torch.arange(1.0, 9.0).reshape(2, 4)
    return [tensor, tensor * 2], torch.tensor([0.5, 0.5])


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
def test_peft_merge_cases(installed, method, density):
    ts, w = _peft_fixture()
    mine = {n: getattr(mu, n) for n in PEFT_METHODS}
    with peft_code():
        torch.manual_seed(0)
        want = PEFT_METHODS[method](ORIG, [t.clone() for t in ts], w, density)
    torch.manual_seed(0)
    got = PEFT_METHODS[method](mine, [t.clone() for t in ts], w, density)
    assert_bits(got, want, f"{method} density={density}")
    if density > 0:
        assert torch.isfinite(got).all()
    if density == 0 and method in ("ties", "magnitude_prune"):
        assert torch.equal(got, torch.zeros_like(got))


def test_peft_random_pruning_rescales(installed):
    torch.manual_seed(0)
    pruned = mu.prune(torch.ones(1000), 0.5, "random", rescale=True)
    kept = pruned[pruned != 0]
    assert len(kept) > 0 and torch.equal(kept, torch.full_like(kept, 2.0))
    assert torch.equal(mu.prune(torch.arange(1.0, 9.0).reshape(2, 4), 0.0, "magnitude"), torch.zeros(2, 4))


# ------------------------------------------------------------------------------ add_weighted_adapter


class SimpleModel(torch.nn.Module):
    """PEFT's tests/test_negative_weights.py model."""

    def __init__(self, input_dim=10, hidden_dim=20, output_dim=5):
        super().__init__()
        self.linear1 = torch.nn.Linear(input_dim, hidden_dim)
        self.linear2 = torch.nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


def _model(dtype, alphas=(16, 32, 8)):
    torch.manual_seed(0)
    cfgs = [LoraConfig(r=8, lora_alpha=a, target_modules=["linear1", "linear2"], lora_dropout=0.0,
                       init_lora_weights=False) for a in alphas]
    model = get_peft_model(SimpleModel().to(dtype), cfgs[0], adapter_name="a0")
    for i, cfg in enumerate(cfgs[1:], 1):
        model.add_adapter(f"a{i}", cfg)
    return model.to(dtype)


def _merged(dtype, combination_type, weights, density, sign):
    model = _model(dtype)
    kw = {} if combination_type in ("linear", "svd") else {"density": density}
    torch.manual_seed(1)
    model.add_weighted_adapter([f"a{i}" for i in range(len(weights))], weights, "merged",
                               combination_type=combination_type, majority_sign_method=sign, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "merged" in k}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_ties", "dare_linear", "magnitude_prune",
                                              "ties_svd", "magnitude_prune_svd"])
def test_add_weighted_adapter_same_weights(combination_type, dtype):
    weights, density, sign = [0.6, -0.4, 1.3], 0.5, "frequency" if combination_type == "ties" else "total"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # both runs: the SVD's (LAPACK) last bits depend on the thread count
    try:
        want = _merged(dtype, combination_type, weights, density, sign)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(1)
    wp.install(min_numel=0)
    try:
        wp.stats.clear()
        got = _merged(dtype, combination_type, weights, density, sign)
        stats = dict(wp.stats)
    finally:
        wp.uninstall()
        torch.set_num_threads(threads)
    assert want and want.keys() == got.keys()
    for k in want:
        assert_bits(got[k], want[k], f"{combination_type} {k}")
    assert any(key.endswith("_wweight") for key in stats), stats   # it did run on wweight


def test_add_weighted_adapter_subtraction(installed):
    """PEFT's test_subtraction_with_negative_weights, with install(): A = sqrt(s1) A1 - sqrt(s2) A2."""
    model = _model(torch.float32, alphas=(16, 16))
    model.add_weighted_adapter(["a0", "a1"], [1.0, -1.0], "difference", combination_type="linear")
    for module in model.modules():
        if hasattr(module, "lora_A") and "difference" in module.lora_A:
            s1, s2 = module.scaling["a0"], module.scaling["a1"]
            a1, a2 = module.lora_A["a0"].weight.data, module.lora_A["a1"].weight.data
            b1, b2 = module.lora_B["a0"].weight.data, module.lora_B["a1"].weight.data
            torch.testing.assert_close(module.lora_A["difference"].weight.data, s1 ** 0.5 * a1 - s2 ** 0.5 * a2)
            torch.testing.assert_close(module.lora_B["difference"].weight.data, s1 ** 0.5 * b1 + s2 ** 0.5 * b2)
    assert wp.stats.get("sum_wweight", 0) > 0


def test_no_warnings_from_the_wrappers(installed):
    ts, w = _peft_fixture()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mu.ties(ts, w, 0.5)
        mu.magnitude_prune(ts, w, 0.5)


def test_wrappers_have_peft_signatures():
    import inspect

    for name in wp.PATCHED:
        mine = [(p.name, p.default, p.kind) for p in inspect.signature(getattr(wp, name)).parameters.values()]
        theirs = [(p.name, p.default, p.kind) for p in inspect.signature(ORIG[name]).parameters.values()]
        assert mine == theirs, name
