"""Shared helpers of tests/test_checkpoint*.py and tests/test_cli*.py (no tests in here).

``mergekit_tensors`` is the independent reference for one key: mergekit 0.1.5's own in-memory
merge API (``mergekit.merge_methods.api.merge_tensors``), called with wweight's argument names.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import sys

import torch
import yaml


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mergekit_tensors(method, base, tensors, weights=None, density=1.0, gamma=0.01, epsilon=0.15,
                     lambda_=1.0, normalize=None, rescale=None, seed=None, backend=None):
    """mergekit 0.1.5's in-memory merge of one key (the independent reference)."""
    from mergekit.merge_methods.api import merge_tensors as mk

    k = len(tensors)

    def per(v, off):
        return {i + off: float(v[i] if isinstance(v, (list, tuple)) else v) for i in range(k)}

    if method == "linear":
        params = {"weight": per(weights, 0)}
        if normalize is not None:
            params["normalize"] = normalize
        return mk(list(tensors), "linear", parameters=params, ids=list(range(k)))
    params = {"weight": per(weights, 1), "density": per(density, 1), "lambda": float(lambda_)}
    if method.startswith("breadcrumbs"):
        params["gamma"] = per(gamma, 1)
    if method.startswith("della"):
        params["epsilon"] = per(epsilon, 1)
    if normalize is not None:
        params["normalize"] = normalize
    if rescale is not None:
        params["rescale"] = rescale
    if seed is not None:
        torch.manual_seed(seed)
    return mk([base] + list(tensors), method, parameters=params, ids=list(range(k + 1)), base_index=0)


def write_yaml(path, method, base, models, model_params=None, top=None, **extra):
    cfg = {"merge_method": method}
    if base is not None:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(m), **({"parameters": dict(p)} if p else {})}
                     for m, p in zip(models, model_params or [None] * len(models))]
    if top:
        cfg["parameters"] = dict(top)
    cfg.update(extra)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return str(path)


def files_bytes(d):
    """{relative file name: bytes} of a directory (for byte-identity checks)."""
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read()
    return out


def leftovers(parent, name):
    """Temporary directories the engine left beside OUT_DIR (must be none)."""
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.wweight-tmp")]


def run_cli(*args, env=None, timeout=120):
    e = dict(os.environ)   # the installed wweight (not the checkout), like a user's shell
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "wweight", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=tempfile.gettempdir())
