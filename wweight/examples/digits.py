"""Tiny offline training kit on scikit-learn's bundled 8x8 digits (1,797 images, no download).

Used by ``wweight demo``, by the merging/matching proofs in the tests and by the docs. Everything is
seeded and runs on CPU in well under a second per model.

Tasks for merging experiments are disjoint class subsets (``task_classes``); a model fine-tuned on a
task is a full 10-way classifier trained only on that task's images, so a merge that keeps every
task's knowledge shows up as a higher accuracy on the union of tasks.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn


def load_digits_tensors(test_fraction: float = 0.3, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (N, 64) float32 in [0, 1], y_train (N,) int64, x_test, y_test), a seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the [test]/[demo] extras install it
        raise ImportError("the digits examples need scikit-learn: pip install 'wweight[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def make_mlp(hidden: Sequence[int] = (128, 128), seed: int = 0, n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """MLP with Linear layers named ``0, 2, 4, ...`` (ReLU between): state-dict keys ``"0.weight"`` etc."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    prev = n_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, lr: float = 1e-2,
          batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Adam on cross-entropy, seeded minibatch order. Trains ``model`` in place and returns it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return nn.functional.cross_entropy(model(x), y).item()


def task_classes(n_tasks: int) -> List[List[int]]:
    """Split the 10 classes into ``n_tasks`` disjoint, nearly equal groups (e.g. 5 tasks of 2 classes)."""
    if not 1 <= n_tasks <= 10:
        raise ValueError(f"n_tasks must be in 1..10, got {n_tasks}")
    return [list(range(10))[t::n_tasks] for t in range(n_tasks)]


def subset(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(list(classes)))
    return x[keep], y[keep]


def finetune_zoo(n_tasks: int = 5, hidden: Sequence[int] = (128, 128), *, base_epochs: int = 3,
                 ft_epochs: int = 15, seed: int = 0) -> Dict[str, object]:
    """A base model briefly trained on all data plus one fine-tune per task (disjoint classes).

    Returns a dict with ``base`` (state dict), ``finetuned`` (list of state dicts), ``tasks`` (class
    lists), ``make_model`` (callable building an empty model) and the data splits.
    """
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed=seed)
    base = train(make_mlp(hidden, seed=seed), x_tr, y_tr, epochs=base_epochs, lr=1e-3, seed=seed)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tasks = task_classes(n_tasks)
    fts = []
    for t, cls in enumerate(tasks):
        m = make_mlp(hidden, seed=seed)
        m.load_state_dict(base_sd)
        xs, ys = subset(x_tr, y_tr, cls)
        train(m, xs, ys, epochs=ft_epochs, lr=1e-3, seed=seed + 1 + t)
        fts.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return {
        "base": base_sd, "finetuned": fts, "tasks": tasks,
        "make_model": lambda: make_mlp(hidden, seed=seed),
        "data": (x_tr, y_tr, x_te, y_te),
    }


def evaluate_state_dict(sd: Dict[str, torch.Tensor], make_model, x: torch.Tensor, y: torch.Tensor,
                        tasks: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Accuracy on the whole test set and per task (restricted to that task's classes)."""
    m = make_model()
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    out = {"all": accuracy(m, x, y)}
    for t, cls in enumerate(tasks):
        xs, ys = subset(x, y, cls)
        out[f"task{t}"] = accuracy(m, xs, ys)
    return out
