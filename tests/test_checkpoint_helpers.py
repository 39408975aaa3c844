"""Shared helpers of tests/test_checkpoint*.py and tests/test_cli*.py (no tests in here).

``mergekit_tensors`` is the independent reference for one key: mergekit 0.1.5's own in-memory
merge API (``mergekit.merge_methods.api.merge_tensors``), called with wweight's argument names.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

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


def run_main(capsys, *argv):
    """``wweight.cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    from wweight import cli

    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def start_slow_merge(cfg, out_dir, cwd, **popen_kw):
    """Start ``wweight merge cfg out_dir`` in a subprocess whose every tensor takes 0.5 s, and return
    it once the merge has created its temporary directory beside ``out_dir`` (or after 60 s), so a
    test can signal it mid-merge."""
    script = (
        "import sys, time, wweight.merge as m\n"
        "real = m.merge_tensors\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.5)\n"
        "    return real(*a, **k)\n"
        "m.merge_tensors = slow\n"
        "from wweight.cli import main\n"
        f"sys.exit(main(['merge', {str(cfg)!r}, {str(out_dir)!r}, '-q']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), cwd=str(cwd), **popen_kw)
    parent, name = os.path.split(str(out_dir))
    deadline = time.time() + 60
    while not leftovers(parent, name) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc
