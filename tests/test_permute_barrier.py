"""Proof on real training (Git Re-Basin's MLP experiment, on scikit-learn's digits, CPU).

Two MLPs trained from different seeds have a loss barrier on the straight line between them; after
weight matching B to A the barrier must fall to <= 20% of the naive one. A planted permutation of a
trained model must be recovered exactly.
"""
import pytest
import torch

from wweight.examples.digits import load_digits_tensors, loss, make_mlp, train
from wweight.permute import apply_permutation, random_permutation, weight_matching
from wweight.permute.specs import mlp_spec

HIDDEN = (128, 128)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and immune to a busy machine
    try:
        x_tr, y_tr, x_te, y_te = load_digits_tensors()
        sds = []
        for seed in (1, 2):
            m = train(make_mlp(HIDDEN, seed=seed), x_tr, y_tr, epochs=10, lr=3e-3, batch_size=128, seed=seed)
            sds.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        yield sds[0], sds[1], (x_te, y_te)
    finally:
        torch.set_num_threads(threads)


def _curve(sa, sb, x, y, n=11):
    m = make_mlp(HIDDEN)
    out = []
    for i in range(n):
        lam = i / (n - 1)
        m.load_state_dict({k: (1 - lam) * sa[k] + lam * sb[k] for k in sa})
        out.append(loss(m, x, y))
    return out


def _barrier(c):
    n = len(c) - 1
    return max(c[i] - ((1 - i / n) * c[0] + (i / n) * c[-1]) for i in range(n + 1))


def test_matching_removes_the_barrier(trained):
    sa, sb, (x, y) = trained
    spec = mlp_spec(["0", "2", "4"])
    perms = weight_matching(spec, sa, sb)
    sb_aligned = apply_permutation(spec, perms, sb)
    # B's function is unchanged by the permutation
    assert _curve(sb, sb_aligned, x, y, n=2)[1] == pytest.approx(_curve(sb, sb, x, y, n=2)[1], abs=1e-5)
    naive = _barrier(_curve(sa, sb, x, y))
    matched = _barrier(_curve(sa, sb_aligned, x, y))
    assert naive > 0.1, naive  # the experiment is meaningful: a real barrier exists
    assert matched <= 0.2 * naive, (naive, matched)


def test_planted_permutation_of_trained_model_recovered(trained):
    sa, _, _ = trained
    spec = mlp_spec(["0", "2", "4"])
    planted = random_permutation(spec, sa, seed=123)
    sb = apply_permutation(spec, planted, sa)
    perms = weight_matching(spec, sa, sb)
    back = apply_permutation(spec, perms, sb)
    for k in sa:
        assert torch.equal(back[k], sa[k]), k
    # perms[p] maps new -> old: composing with the planted one gives the identity
    for p in perms:
        assert torch.equal(planted[p][perms[p]], torch.arange(len(perms[p])))
