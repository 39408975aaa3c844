"""Benchmark of the permute family: exact LAP solvers, Git Re-Basin weight matching, the digits barrier.

``python -m benchmarks permute [--quick] [--device cuda]``

* LAP, same random float64 costs (``torch.rand``) for every solver in one run: single problems
  n = 256 ... 4096 (11008 with ``--device cuda``; quick: 256, 512) and batches of 1,024 x 128x128 and
  256 x 64x64 (quick: the latter). Solvers: wweight ``auto`` (its dispatch), the C++ LAPJV (``backend="cpu"``,
  when the ``_cpu`` extension has it), the torch auction (``method="auction"``; on CPU tensors only up to
  n = 1024 and 256 x 64x64: it is the CPU model of a GPU solver, minutes beyond), scipy (a loop), ``lap.lapjv``
  (a loop; square costs, so ``extend_cost`` is not needed) and, with ``--device cuda``, the GPU peers
  ``torch_linear_assignment`` / ``torch_lap_cuda`` (imported if installed, else recorded as not installed).
  Every wweight answer's optimal value is compared with scipy's (exactly rounded sums, 1e-12 relative);
  the auction rows give its rounds / certificate iterations, and every wweight row the scipy fallbacks.
* Weight matching for a Llama-shaped pair (``llama_spec``: hidden 4096, MLP 11008, 32 heads / 8 KV heads,
  head_dim 128, vocab 1024, 2 layers, random fp32 weights ~1.4 GB per model; quick: hidden 256, MLP 688,
  8 / 2 heads): time per round and the LAP share of it (the LAP call inside ``weight_matching`` is wrapped
  with a timer; results unchanged). Full runs also time ResNet-20 (width x4) and GPT-2-small shaped state
  dicts against the plain PyTorch + scipy port in wweight.reference.permute.
* The digits barrier experiment: loss along the linear path before / after matching, saved as
  ``docs/barrier.png`` (matplotlib) and in the results JSON.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import time

import numpy as np
import torch

from benchmarks.common import bench, sync, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_AUCTION_CPU_MAX = 256 * 64 * 64  # problems x n^2: beyond, the torch auction on CPU tensors takes minutes


def _values(cost_np, cols):
    """Exactly rounded assignment value of every problem (rows = arange, square)."""
    return [math.fsum(c[np.arange(len(col)), col].tolist()) for c, col in zip(cost_np, cols)]


def _gpu_peers():
    """{name: solve(cost (B, n, n) cuda) -> col (B, n)} of the installed GPU peers, {name: why} of the others."""
    peers, missing = {}, {}
    try:
        tla = importlib.import_module("torch_linear_assignment")
        peers["torch-linear-assignment"] = lambda c: tla.batch_linear_assignment(c)
    except Exception as e:  # ImportError, or a wheel built for another torch
        missing["torch-linear-assignment"] = f"not installed ({type(e).__name__})"
    try:
        tlc = importlib.import_module("torch_lap_cuda")
        peers["torch-lap-cuda"] = lambda c: tlc.solve_lap(c)
    except Exception as e:
        missing["torch-lap-cuda"] = f"not installed ({type(e).__name__})"
    return peers, missing


def _solvers(device, B, n):
    """[(name, fn(cost_t, cost_np) -> col (B, n) numpy, stats dict or None)] for one case."""
    import wweight
    import wweight.permute.lap as lap_op

    def ww(**kw):
        def run(ct, _np):
            return wweight.linear_sum_assignment(ct, **kw)[1].reshape(B, n).cpu().numpy()
        return run

    out = [("wweight auto", ww(), None)]
    if device.type == "cpu" and lap_op._module("cpu") is not None:
        out.append(("wweight cpu (C++ LAPJV)", ww(backend="cpu"), None))
    if device.type == "cuda" and lap_op._module("cuda") is not None:
        out.append(("wweight cuda", ww(backend="cuda"), None))
    if device.type != "cpu" or B * n * n <= _AUCTION_CPU_MAX:
        tp = importlib.import_module("wweight.backends.torch.permute")
        out.append(("wweight torch auction", ww(method="auction"), tp.stats))

    def scipy_loop(_ct, cnp):
        from scipy.optimize import linear_sum_assignment as sp
        return np.stack([sp(c)[1] for c in cnp])

    out.append(("scipy", scipy_loop, None))
    try:
        import lap

        out.append(("lap.lapjv", lambda _ct, cnp: np.stack([lap.lapjv(c)[1] for c in cnp]), None))
    except ImportError:
        pass
    return out


def bench_lap(device, singles, batches, rows, max_time):
    import wweight.permute.lap as lap_op

    g = torch.Generator().manual_seed(0)
    peers, missing = _gpu_peers() if device.type == "cuda" else ({}, {})
    for name, why in missing.items():
        rows.append({"case": "GPU peer", "solver": name, "note": why})
    for B, n in [(1, s) for s in singles] + list(batches):
        cost_cpu = torch.rand(B, n, n, generator=g, dtype=torch.float64)
        cost_np = cost_cpu.numpy()
        ct = cost_cpu.to(device)
        case = f"LAP {n}x{n}" if B == 1 else f"LAP batch {B}x{n}x{n}"
        ct_in = ct[0] if B == 1 else ct
        iters = 1 if n >= 2048 else 3
        want = t_scipy = None
        solvers = _solvers(device, B, n)
        solvers += [(nm, lambda c_t, _n, f=f: f(c_t).cpu().numpy(), None) for nm, f in peers.items()]
        for name, fn, st in solvers:
            arg = ct_in if name.startswith("wweight") else ct
            row = {"case": case, "solver": name}
            try:
                row["time_s"] = bench(lambda: fn(arg, cost_np), device, warmup=1 if n < 2048 else 0, iters=iters,
                                      max_time=max_time)
                if st is not None:  # counters of one solve: the last one
                    for k in st:
                        st[k] = 0
                fb0 = dict(lap_op.stats)
                col = fn(arg, cost_np)
            except Exception as e:  # a peer that fails is recorded, not fatal
                row["note"] = f"failed: {type(e).__name__}: {e}"[:120]
                rows.append(row)
                continue
            row["_vals"] = _values(cost_np, col.reshape(B, n))
            if name.startswith("wweight"):
                row["fallbacks"] = lap_op.stats["fallbacks"] - fb0["fallbacks"]
                row["certified"] = lap_op.stats["certified"] - fb0["certified"]
            if st is not None:
                row["auction_rounds"] = st.get("rounds", 0)
                row["certify_iters"] = st.get("certify_iters", 0)
            if name == "scipy":
                want, t_scipy = row["_vals"], row["time_s"]
            rows.append(row)
        for row in rows:
            if row.get("case") == case and "_vals" in row:
                vals = row.pop("_vals")
                row["same_optimum"] = all(abs(a - b) <= 1e-12 * n for a, b in zip(vals, want))
                row["vs_scipy"] = t_scipy / row["time_s"]
                print(row, flush=True)


class _LapTimer:
    """Wraps the LAP call of weight_matching (results unchanged) and attributes its time to rounds."""

    def __init__(self):
        import wweight.permute.matching as wm

        self.wm, self.orig = wm, wm.linear_sum_assignment
        self.pending, self.lap_s, self.round_end = 0.0, {}, {}

    def __enter__(self):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = self.orig(*a, **k)
            self.pending += time.perf_counter() - t0
            return out

        self.wm.linear_sum_assignment = timed
        return self

    def __exit__(self, *exc):
        self.wm.linear_sum_assignment = self.orig

    def callback(self, h):  # called after every perm update, after its LAP calls
        it = h["iteration"]
        self.lap_s[it] = self.lap_s.get(it, 0.0) + self.pending
        self.pending = 0.0
        self.round_end[it] = time.perf_counter()


def _llama_sd(n_layer, d, f, n_head, n_kv, head_dim, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": 1 + r(d), "lm_head.weight": r(vocab, d)}
    for i in range(n_layer):
        h = f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = 1 + r(d)
        sd[h + "post_attention_layernorm.weight"] = 1 + r(d)
        sd[h + "self_attn.q_proj.weight"] = r(n_head * head_dim, d)
        sd[h + "self_attn.k_proj.weight"] = r(n_kv * head_dim, d)
        sd[h + "self_attn.v_proj.weight"] = r(n_kv * head_dim, d)
        sd[h + "self_attn.o_proj.weight"] = r(d, n_head * head_dim)
        sd[h + "mlp.gate_proj.weight"] = r(f, d)
        sd[h + "mlp.up_proj.weight"] = r(f, d)
        sd[h + "mlp.down_proj.weight"] = r(d, f)
    return sd


def bench_llama(device, quick, max_iter, rows):
    import wweight
    from wweight.permute.specs import llama_spec

    if quick:
        cfg = dict(n_layer=2, d=256, f=688, n_head=8, n_kv=2, head_dim=32, vocab=256)
    else:
        cfg = dict(n_layer=2, d=4096, f=11008, n_head=32, n_kv=8, head_dim=128, vocab=1024)
    spec = llama_spec(cfg["n_layer"], cfg["n_head"], cfg["n_kv"], cfg["head_dim"])
    have = set(spec.axes_to_perm)
    a = {k: v.to(device) for k, v in _llama_sd(seed=0, **cfg).items() if k in have}
    b = {k: v.to(device) for k, v in _llama_sd(seed=1, **cfg).items() if k in have}
    nparams = sum(v.numel() for v in a.values())
    with _LapTimer() as tm:
        sync(device)
        t0 = time.perf_counter()
        perms = wweight.weight_matching(spec, a, b, max_iter=max_iter, callback=tm.callback)
        sync(device)
        total = time.perf_counter() - t0
    prev = t0
    for it in sorted(tm.round_end):
        t_round = tm.round_end[it] - prev
        prev = tm.round_end[it]
        rows.append({"case": f"weight matching Llama {cfg['d']}/{cfg['f']}, {cfg['n_head']}/{cfg['n_kv']} heads, "
                             f"{cfg['n_layer']} layers, fp32", "round": it, "round_s": t_round,
                     "lap_s": tm.lap_s[it], "lap_share": tm.lap_s[it] / t_round, "params_M": nparams / 1e6,
                     "perms": len(perms), "total_s": total})
        print(rows[-1], flush=True)
    del a, b


def _resnet_sd(width=4, blocks=(3, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [16 * width, 32 * width, 64 * width]
    sd = {}

    def conv(name, cout, cin, k):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5

    def bn(name, c):
        sd[name + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_var"] = torch.rand(c, generator=g) + 0.5

    conv("conv1", w[0], 3, 3)
    bn("bn1", w[0])
    cin = w[0]
    for s, nb in enumerate(blocks, start=1):
        for b in range(nb):
            pre = f"layer{s}.{b}"
            conv(pre + ".conv1", w[s - 1], cin, 3)
            bn(pre + ".bn1", w[s - 1])
            conv(pre + ".conv2", w[s - 1], w[s - 1], 3)
            bn(pre + ".bn2", w[s - 1])
            if b == 0 and s > 1:
                conv(pre + ".shortcut.0", w[s - 1], cin, 1)
                bn(pre + ".shortcut.1", w[s - 1])
            cin = w[s - 1]
    sd["linear.weight"] = torch.randn(10, cin, generator=g) / cin ** 0.5
    sd["linear.bias"] = torch.zeros(10)
    return sd


def _gpt2_sd(n_layer=12, d=768, vocab=50257, n_pos=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"transformer.wte.weight": r(vocab, d), "transformer.wpe.weight": r(n_pos, d)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[h + ln + ".weight"], sd[h + ln + ".bias"] = 1 + r(d), r(d)
        sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"] = r(d, 3 * d), r(3 * d)
        sd[h + "attn.c_proj.weight"], sd[h + "attn.c_proj.bias"] = r(d, d), r(d)
        sd[h + "mlp.c_fc.weight"], sd[h + "mlp.c_fc.bias"] = r(d, 4 * d), r(4 * d)
        sd[h + "mlp.c_proj.weight"], sd[h + "mlp.c_proj.bias"] = r(4 * d, d), r(d)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + r(d), r(d)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def bench_matching(device, quick, max_iter, rows, reps=2):
    import wweight
    from wweight.permute.specs import gpt2_spec, resnet_spec
    from wweight.reference.permute import weight_matching_reference

    cases = [("ResNet-20 x4", resnet_spec((3, 3, 3)), _resnet_sd(seed=0), _resnet_sd(seed=1), None)]
    nl = 2 if quick else 12
    cases.append((f"GPT-2-small shape ({nl} layers)", gpt2_spec(nl, 12, 64, permute_heads=False),
                  _gpt2_sd(nl, seed=0), _gpt2_sd(nl, seed=1), gpt2_spec(nl, 12, 64)))
    for name, spec, a, b, spec_heads in cases:
        a = {k: v.to(device) for k, v in a.items()}
        b = {k: v.to(device) for k, v in b.items()}
        nparams = sum(v.numel() for k, v in a.items() if k != "lm_head.weight")
        # alternate the two implementations and keep the best of `reps` runs: a busy CPU otherwise
        # decides the ranking
        t_ww = t_ref = float("inf")
        for _ in range(reps):
            hist = []
            sync(device)
            t0 = time.perf_counter()
            p_ww = wweight.weight_matching(spec, a, b, max_iter=max_iter, callback=hist.append)
            sync(device)
            t_ww = min(t_ww, time.perf_counter() - t0)
            t0 = time.perf_counter()
            p_ref = weight_matching_reference(spec, a, b, max_iter=max_iter, cost_dtype=torch.float32)
            sync(device)
            t_ref = min(t_ref, time.perf_counter() - t0)
        its = max(h["iteration"] for h in hist) + 1
        same = all(torch.equal(p_ww[p].cpu(), p_ref[p].cpu()) for p in p_ref)
        rows.append({"case": f"weight matching {name}", "params_M": nparams / 1e6, "perms": len(p_ww),
                     "iterations": its, "wweight_s": t_ww, "torch+scipy_s": t_ref, "speedup": t_ref / t_ww,
                     "same_perms": same})
        print(rows[-1], flush=True)
        if spec_heads is not None:
            hist = []
            t0 = time.perf_counter()
            p_h = wweight.weight_matching(spec_heads, a, b, max_iter=max_iter, callback=hist.append)
            sync(device)
            t_h = time.perf_counter() - t0
            rows.append({"case": f"weight matching {name} + per-head perms", "params_M": nparams / 1e6,
                         "perms": len(p_h), "iterations": max(h["iteration"] for h in hist) + 1,
                         "wweight_s": t_h, "torch+scipy_s": "", "speedup": "", "same_perms": ""})
            print(rows[-1], flush=True)


def barrier_experiment(plot_path):
    from wweight.examples.digits import load_digits_tensors, loss, make_mlp, train
    from wweight.permute import apply_permutation, weight_matching
    from wweight.permute.specs import mlp_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hidden = (128, 128)
        x_tr, y_tr, x_te, y_te = load_digits_tensors()
        nets = [train(make_mlp(hidden, seed=s), x_tr, y_tr, epochs=10, lr=3e-3, batch_size=128, seed=s)
                for s in (1, 2)]
        sa, sb = [{k: v.detach().clone() for k, v in net.state_dict().items()} for net in nets]
        spec = mlp_spec(["0", "2", "4"])
        sb2 = apply_permutation(spec, weight_matching(spec, sa, sb), sb)
        lams = [i / 20 for i in range(21)]

        def curve(x, y, s1, s2):
            m = make_mlp(hidden)
            out = []
            for lam in lams:
                m.load_state_dict({k: (1 - lam) * s1[k] + lam * s2[k] for k in s1})
                out.append(loss(m, x, y))
            return out

        res = {"lambda": lams}
        for split, (x, y) in (("train", (x_tr, y_tr)), ("test", (x_te, y_te))):
            res[f"naive_{split}"] = curve(x, y, sa, sb)
            res[f"matched_{split}"] = curve(x, y, sa, sb2)

        def barrier(c):
            return max(c[i] - ((1 - t) * c[0] + t * c[-1]) for i, t in enumerate(lams))

        res["barrier_naive_test"] = barrier(res["naive_test"])
        res["barrier_matched_test"] = barrier(res["matched_test"])
    finally:
        torch.set_num_threads(threads)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'wweight[plot]')")
        return res
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    ax.plot(lams, res["naive_test"], "-o", ms=3, color="tab:red", label="naive (test)")
    ax.plot(lams, res["naive_train"], "--", color="tab:red", alpha=0.6, label="naive (train)")
    ax.plot(lams, res["matched_test"], "-o", ms=3, color="tab:blue", label="weight matching (test)")
    ax.plot(lams, res["matched_train"], "--", color="tab:blue", alpha=0.6, label="weight matching (train)")
    ax.set_xlabel(r"$\lambda$  ($(1-\lambda)\,\theta_A + \lambda\,\pi(\theta_B)$)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Digits MLP 64-128-128-10, two seeds", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(plot_path), exist_ok=True)
    fig.savefig(plot_path)
    plt.close(fig)
    res["plot"] = os.path.relpath(plot_path, ROOT)
    print("wrote", plot_path)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks permute", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU: about a minute)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="single LAP sizes n")
    ap.add_argument("--batch", type=int, default=None, help="number of batched problems (with --head-n)")
    ap.add_argument("--head-n", type=int, default=None, help="size of each batched problem")
    ap.add_argument("--max-iter", type=int, default=None, help="weight-matching rounds (ResNet / GPT-2)")
    ap.add_argument("--llama-iter", type=int, default=None, help="weight-matching rounds of the Llama pair")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lap", "llama", "matching", "barrier"])
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "barrier.png"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.sizes is not None:
        singles = args.sizes
    elif args.quick:
        singles = [256, 512]
    else:
        singles = [256, 512, 1024, 2048, 4096] + ([11008] if dev.type == "cuda" else [])
    if args.batch or args.head_n:
        batches = [(args.batch or 256, args.head_n or 64)]
    else:
        batches = [(256, 64)] if args.quick else [(1024, 128), (256, 64)]
    max_iter = args.max_iter or (3 if args.quick else 10)
    llama_iter = args.llama_iter or (2 if args.quick else 1)
    rows, extra = [], {"quick": args.quick, "max_iter": max_iter, "llama_iter": llama_iter}
    if "lap" not in args.skip:
        bench_lap(dev, singles, batches, rows, max_time=120)
    if "llama" not in args.skip:
        bench_llama(dev, args.quick, llama_iter, rows)
    if "matching" not in args.skip and not args.quick:
        bench_matching(dev, args.quick, max_iter, rows)
    if "barrier" not in args.skip:
        extra["barrier"] = barrier_experiment(args.plot)
        extra["barrier_naive"] = round(extra["barrier"]["barrier_naive_test"], 4)
        extra["barrier_matched"] = round(extra["barrier"]["barrier_matched_test"], 4)
    cols = ["case", "solver", "time_s", "vs_scipy", "same_optimum", "fallbacks", "certified", "auction_rounds",
            "certify_iters", "note", "round", "round_s", "lap_s", "lap_share", "wweight_s", "torch+scipy_s",
            "speedup", "same_perms", "params_M", "perms", "iterations"]
    md = write_results("permute", dev, rows, extra=extra, columns=cols, title="permute (LAP + weight matching)",
                       tag=f"{dev.type}-quick" if args.quick else None)
    print(md)
    return 0
