"""Benchmark of the permute family: exact LAP and Git Re-Basin weight matching.

``python -m benchmarks permute [--quick] [--device cuda]``

* LAP: random float costs n = 512 ... 8192 (quick: 256 ... 1024) and a batch of 1,024 problems of
  128x128 (quick: 256 of 64x64), wweight (auto: scipy on CPU, certified batched auction on GPU)
  against a scipy loop on the same machine; the optimal values are compared.
* Weight matching for a ResNet-20 (width x4) and a GPT-2-small shaped state dict (random weights;
  quick: 2 GPT-2 layers), wweight vs the plain PyTorch + scipy port in wweight.reference.permute
  (same seed, same visiting order, same max_iter), plus wweight with per-head perms.
* The digits barrier experiment: loss along the linear path before / after matching, saved as
  ``docs/barrier.png`` (matplotlib) and in the results JSON.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import bench, sync, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scipy_loop(cost_np):
    from scipy.optimize import linear_sum_assignment as sp

    out = [sp(c) for c in cost_np]
    return out


def bench_lap(device, sizes, batch, head_n, rows, max_time):
    import wweight
    import wweight.backends.torch.permute as lap

    g = torch.Generator().manual_seed(0)
    for n in sizes:
        cost = torch.rand(n, n, generator=g).to(device)
        cost_np = cost.double().cpu().numpy()[None]
        t_sp = bench(lambda: _scipy_loop(cost_np), "cpu", warmup=1, iters=2 if n >= 2048 else 5, max_time=max_time)
        for k in lap.stats:
            lap.stats[k] = 0
        t_ww = bench(lambda: wweight.linear_sum_assignment(cost), device, warmup=1, iters=2 if n >= 2048 else 5,
                     max_time=max_time)
        r, c = wweight.linear_sum_assignment(cost)
        r0, c0 = _scipy_loop(cost_np)[0]
        same = bool(abs(cost_np[0][r.cpu().numpy(), c.cpu().numpy()].sum() - cost_np[0][r0, c0].sum()) <= 1e-9 * n)
        rows.append({"case": f"LAP {n}x{n}", "wweight_s": t_ww, "scipy_s": t_sp, "speedup": t_sp / t_ww,
                     "same_optimum": same, "solver": "auction" if torch.device(device).type == "cuda" else "scipy"})
        print(rows[-1], flush=True)
    # batched heads
    B, n = batch, head_n
    cost = torch.randn(B, n, n, generator=g).to(device)
    cost_np = cost.double().cpu().numpy()
    t_sp = bench(lambda: _scipy_loop(cost_np), "cpu", warmup=1, iters=3, max_time=max_time)
    t_ww = bench(lambda: wweight.linear_sum_assignment(cost), device, warmup=1, iters=3, max_time=max_time)
    r, c = wweight.linear_sum_assignment(cost)
    ref = _scipy_loop(cost_np)
    same = all(abs(cost_np[b][r[b].cpu().numpy(), c[b].cpu().numpy()].sum() - cost_np[b][ref[b][0], ref[b][1]].sum())
               <= 1e-9 * n for b in range(B))
    rows.append({"case": f"LAP batch {B}x{n}x{n}", "wweight_s": t_ww, "scipy_s": t_sp, "speedup": t_sp / t_ww,
                 "same_optimum": same, "solver": "auction" if torch.device(device).type == "cuda" else "scipy"})
    print(rows[-1], flush=True)
    # the GPU solver run on this device, whatever it is (informative on CPU: the solver CI tests)
    for n in sizes[:2]:
        cost = torch.rand(n, n, generator=g).to(device)
        cost_np = cost.double().cpu().numpy()[None]
        for k in lap.stats:
            lap.stats[k] = 0
        t0 = time.perf_counter()
        r, c = wweight.linear_sum_assignment(cost, method="auction")
        sync(device)
        t_auc = time.perf_counter() - t0
        st = dict(lap.stats)
        t_sp = bench(lambda: _scipy_loop(cost_np), "cpu", warmup=0, iters=3, max_time=max_time)
        r0, c0 = _scipy_loop(cost_np)[0]
        same = bool(abs(cost_np[0][r.cpu().numpy(), c.cpu().numpy()].sum() - cost_np[0][r0, c0].sum()) <= 1e-9 * n)
        rows.append({"case": f"LAP {n}x{n} (auction forced)", "wweight_s": t_auc, "scipy_s": t_sp,
                     "speedup": t_sp / t_auc, "same_optimum": same, "solver": "auction",
                     "auction_rounds": st["rounds"], "phases": st["phases"], "scipy_fallbacks": st["fallbacks"]})
        print(rows[-1], flush=True)


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
    r = lambda *s: torch.randn(*s, generator=g) * 0.02
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
        sa, sb = [{k: v.detach().clone() for k, v in
                   train(make_mlp(hidden, seed=s), x_tr, y_tr, epochs=10, lr=3e-3, batch_size=128, seed=s).state_dict().items()}
                  for s in (1, 2)]
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
            return max(c[i] - ((1 - l) * c[0] + l * c[-1]) for i, l in enumerate(lams))

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
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU CI: a few minutes)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="LAP sizes n")
    ap.add_argument("--batch", type=int, default=None, help="number of batched head problems")
    ap.add_argument("--head-n", type=int, default=None, help="size of each batched problem")
    ap.add_argument("--max-iter", type=int, default=None, help="weight-matching rounds (same for both)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lap", "matching", "barrier"])
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "barrier.png"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sizes = args.sizes or ([256, 512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192])
    batch = args.batch or (256 if args.quick else 1024)
    head_n = args.head_n or (64 if args.quick else 128)
    max_iter = args.max_iter or (3 if args.quick else 10)
    rows, extra = [], {"quick": args.quick, "max_iter": max_iter}
    if "lap" not in args.skip:
        bench_lap(dev, sizes, batch, head_n, rows, max_time=120)
    if "matching" not in args.skip:
        bench_matching(dev, args.quick, max_iter, rows)
    if "barrier" not in args.skip:
        extra["barrier"] = barrier_experiment(args.plot)
        extra["barrier_naive"] = round(extra["barrier"]["barrier_naive_test"], 4)
        extra["barrier_matched"] = round(extra["barrier"]["barrier_matched_test"], 4)
    cols = ["case", "wweight_s", "scipy_s", "torch+scipy_s", "speedup", "same_optimum", "same_perms", "solver",
            "params_M", "perms", "iterations", "auction_rounds", "scipy_fallbacks"]
    md = write_results("permute", dev, rows, extra=extra, columns=cols, title="permute (LAP + weight matching)")
    print(md)
    return 0
