"""Whole-checkpoint merge benchmark: ``wweight merge`` vs ``mergekit-yaml`` vs the I/O floor.

``python -m benchmarks checkpoint [--quick] [--size 125m|1b|7b] [--device cpu|cuda] [--methods ...]``

1. Generates a Llama-shaped random checkpoint (``wweight.examples.zoo.make_llama_zoo``: a base and
   ``--models`` fine-tunes, bf16, sharded like Hugging Face) under ``--workdir`` (default: a temp dir).
2. The I/O floor: read every input shard with ``safetensors.torch.load_file`` and write one
   output-sized model with ``save_file`` (same disk, same page-cache state as the merges).
3. For each method (default ties, dare_ties, linear; 3 models): the same YAML through
   ``wweight.checkpoint.run_merge`` and through mergekit's engine (``mergekit.merge.run_merge``,
   what ``mergekit-yaml`` runs), both in-process (interpreter and import time excluded), on
   ``--device``. Outputs are compared (max |diff|, fraction of differing elements).

Page cache: inputs are read once before timing, so all three numbers are warm-cache numbers (the
floor is then memory-copy + write speed, not disk speed). Run on a GPU machine with
``--device cuda`` (default size 7b there); a 2-GPU ``torchrun`` row is not produced here.

``--cli`` instead times the two command lines, ``wweight merge CFG OUT`` against ``mergekit-yaml
CFG OUT``, each in its own subprocess (interpreter start and imports included: what a user waits
for), offline (``HF_HUB_OFFLINE=1``), on the same YAML (same ``dtype``, so the same output dtype),
warm page cache, no fsync on either side (``--no-fsync``; mergekit does not fsync), minimum of
``--repeat`` runs (default 3) per tool, the two tools alternating. Configs: ``CLI_CONFIGS`` below,
one line each; a config ``wweight merge`` refuses (``wweight.config.load_config`` raises) is
reported as skipped with its error. Results: ``results/checkpoint_vs_mergekit_<device>.md``.

    python -m benchmarks checkpoint --cli --size 125m --repeat 3
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.common import write_results


def _yaml(path, method, base, models, dtype):
    import yaml

    params = {"weight": 1.0 / len(models)} if method == "linear" else {"weight": 1.0, "density": 0.5}
    cfg = {"merge_method": method}
    if method != "linear":
        cfg["base_model"] = base
    cfg["models"] = [{"model": m, "parameters": dict(params)} for m in models]
    cfg["dtype"] = dtype
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def _layers(z):
    return int(z["config"]["num_hidden_layers"]) if "config" in z else \
        1 + max(int(k.split(".")[2]) for k, _ in z["shapes"] if k.startswith("model.layers."))


#: (name, config builder(zoo, dtype)): one line per CLI config; a config ``wweight merge`` refuses is
#: reported as skipped with its error.
CLI_CONFIGS = [
    ("slerp", lambda z, dt: {"merge_method": "slerp", "base_model": z["base"], "dtype": dt,
                             "models": [{"model": z["base"]}, {"model": z["models"][0]}],
                             "parameters": {"t": 0.3}}),
    ("model_stock", lambda z, dt: {"merge_method": "model_stock", "base_model": z["base"], "dtype": dt,
                                   "models": [{"model": m} for m in z["models"]]}),
    ("passthrough_slices", lambda z, dt: {"merge_method": "passthrough", "dtype": dt, "slices": [
        {"sources": [{"model": z["base"], "layer_range": [0, _layers(z) // 2 + 1]}]},
        {"sources": [{"model": z["models"][0], "layer_range": [_layers(z) // 2 - 1, _layers(z)]}]}]}),
    ("slerp_gradient", lambda z, dt: {"merge_method": "slerp", "base_model": z["base"], "dtype": dt,
                                      "models": [{"model": z["base"]}, {"model": z["models"][0]}],
                                      "parameters": {"t": [0, 0.5, 1]}}),
]


def _cli(argv, out_dir):
    """(wall seconds, CPU seconds: user + system of the child) of one subprocess run (offline), or
    raises with its stderr tail. The CPU time is the number to trust on a shared machine: wall time
    there includes waiting for a core."""
    import resource
    import subprocess

    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    t = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))}... exited {r.returncode}: {r.stderr[-600:]}")
    return t, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def cli_main(args, z, work, inputs, floor):
    """``wweight merge`` vs ``mergekit-yaml``, subprocesses, the configs of ``CLI_CONFIGS``."""
    import sys

    import yaml

    from wweight.config import load_config

    bindir = os.path.dirname(sys.executable)
    mk_exe = shutil.which("mergekit-yaml", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    names = [n for n in args.methods.split(",") if n] if args.methods_given else [n for n, _ in CLI_CONFIGS]
    rows = []
    for name, build in CLI_CONFIGS:
        if name not in names:
            continue
        cfg = build(z, args.dtype)
        path = os.path.join(work, f"cli_{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        row = {"config": name, "size": args.size_used, "dtype": args.dtype, "repeat": args.repeat,
               "io_floor_s": floor}
        try:
            load_config(path)
        except Exception as e:   # wweight refuses it in this build: say why, time nothing
            row["skipped"] = f"wweight merge refuses it: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(name, row["skipped"], flush=True)
            continue
        ww_cmd = [sys.executable, "-m", "wweight", "merge", path, os.path.join(work, "ww"), "-q", "--no-fsync",
                  "--device", args.device]
        mk_cmd = [mk_exe, path, os.path.join(work, "mk"), "--quiet", "--no-lazy-unpickle", "--no-copy-tokenizer"] + \
            (["--cuda"] if args.device.startswith("cuda") else [])
        ww, mk = [], []
        for _ in range(args.repeat):
            ww.append(_cli(ww_cmd, os.path.join(work, "ww")))
            if mk_exe:
                mk.append(_cli(mk_cmd, os.path.join(work, "mk")))
        row.update({"wweight_s": min(w for w, _ in ww), "wweight_median_s": statistics.median(w for w, _ in ww),
                    "wweight_cpu_s": min(c for _, c in ww)})
        if mk:
            worst, frac = compare(os.path.join(work, "ww"), os.path.join(work, "mk"))
            row.update({"mergekit_s": min(w for w, _ in mk), "mergekit_median_s": statistics.median(w for w, _ in mk),
                        "mergekit_cpu_s": min(c for _, c in mk), "max_abs_diff": worst, "frac_diff": frac})
            row["speedup_vs_mergekit"] = row["mergekit_s"] / row["wweight_s"]
            row["cpu_ratio_mergekit_over_wweight"] = row["mergekit_cpu_s"] / row["wweight_cpu_s"]
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    cols = ["config", "size", "dtype", "wweight_s", "mergekit_s", "speedup_vs_mergekit", "wweight_cpu_s",
            "mergekit_cpu_s", "cpu_ratio_mergekit_over_wweight", "io_floor_s", "wweight_median_s",
            "mergekit_median_s", "max_abs_diff", "frac_diff", "skipped"]
    md = write_results("checkpoint_vs_mergekit", torch.device(args.device), rows, columns=cols,
                       title="wweight merge vs mergekit-yaml (command lines, subprocesses)",
                       extra={"note": f"subprocesses (interpreter start + imports included), offline, warm page "
                                      f"cache, no fsync on either side, minimum of {args.repeat} alternating runs; "
                                      f"*_cpu_s: user + system CPU seconds of the subprocess (minimum)",
                              "generator": f"wweight.examples.zoo.make_llama_zoo({args.size_used!r}, "
                                           f"n_models={args.models})",
                              "mergekit_yaml": mk_exe or "not installed"})
    print(md)
    return rows


def _read_all(dirs):
    from safetensors.torch import load_file

    n = 0
    for d in dirs:
        for fp in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            sd = load_file(fp)
            n += sum(v.numel() * v.element_size() for v in sd.values())
            del sd
    return n


def io_floor(inputs, out_dir):
    """Seconds to read all inputs and write one model of the base's size with plain safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    t0 = time.perf_counter()
    for d in inputs[1:]:
        for fp in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            del_sd = load_file(fp)
            del del_sd
    for fp in sorted(glob.glob(os.path.join(inputs[0], "*.safetensors"))):
        sd = load_file(fp)
        save_file(sd, os.path.join(out_dir, os.path.basename(fp)))
        del sd
    t = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    return t


def run_wweight(cfg_path, out_dir, device):
    from wweight.checkpoint import run_merge
    from wweight.config import load_config

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    run_merge(load_config(cfg_path), out_dir, device=device, progress=False, overwrite=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_mergekit(cfg_path, out_dir, device):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
    t0 = time.perf_counter()
    run_merge(cfg, out_dir, MergeOptions(device=device, copy_tokenizer=False, quiet=True, lazy_unpickle=False))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(a_dir, b_dir):
    from wweight.checkpoint import load_checkpoint

    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    worst, diff, n = 0.0, 0, 0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        worst = max(worst, float(d.max())) if d.numel() else worst
        diff += int((d > 0).sum())
        n += d.numel()
    return worst, diff / max(n, 1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="25M-parameter model (a CPU run of a few minutes)")
    p.add_argument("--size", default=None, help="tiny|25m|125m|1b|7b (default: 7b on cuda, 125m on cpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--methods", default=None, help="default ties,dare_ties,linear (--cli: every CLI_CONFIGS entry)")
    p.add_argument("--cli", action="store_true", help="wweight merge vs mergekit-yaml as subprocesses (see above)")
    p.add_argument("--dtype", default="bfloat16", help="storage and compute dtype (default bfloat16)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per engine (median; --cli: minimum, 3)")
    args = p.parse_args(argv)
    args.methods_given = args.methods is not None
    args.methods = args.methods or "ties,dare_ties,linear"
    args.repeat = args.repeat or (3 if args.cli else 1)
    dev = torch.device(args.device)
    size = args.size or ("25m" if args.quick else ("7b" if dev.type == "cuda" else "125m"))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    work = args.workdir or tempfile.mkdtemp(prefix="wweight-bench-ckpt-")
    from wweight.examples.zoo import make_llama_zoo

    t0 = time.perf_counter()
    z = make_llama_zoo(os.path.join(work, f"llama-{size}"), size, n_models=args.models, dtype=dtype,
                       max_shard_size="2GB")
    gen_s = time.perf_counter() - t0
    inputs = [z["base"]] + list(z["models"])
    n_params = sum(int(torch.Size(s).numel()) for _, s in z["shapes"])
    model_bytes = n_params * torch.empty((), dtype=dtype).element_size()
    _read_all(inputs)  # warm the page cache for every engine alike
    floor = io_floor(inputs, os.path.join(work, "floor"))
    print(f"llama-{size}: {n_params / 1e6:.0f}M params, {model_bytes / 1e9:.2f} GB per model, generated in "
          f"{gen_s:.1f} s; I/O floor (read {len(inputs)} models, write 1) {floor:.2f} s", flush=True)
    if args.cli:
        args.size_used = size
        cli_main(args, z, work, inputs, floor)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        cfg = _yaml(os.path.join(work, f"{method}.yaml"), method, z["base"], z["models"], args.dtype)
        n_in = len(inputs) if method != "linear" else len(z["models"])
        ww = statistics.median(run_wweight(cfg, os.path.join(work, "ww"), args.device) for _ in range(args.repeat))
        row = {"method": method, "size": size, "models": args.models, "device": args.device,
               "dtype": args.dtype, "params_M": round(n_params / 1e6, 1),
               "read_GB": round(n_in * model_bytes / 1e9, 3), "write_GB": round(model_bytes / 1e9, 3),
               "io_floor_s": floor, "wweight_s": ww, "wweight_GBps": (n_in + 1) * model_bytes / ww / 1e9,
               "wweight_vs_floor": ww / floor}
        if not args.no_mergekit:
            mk = statistics.median(run_mergekit(cfg, os.path.join(work, "mk"), args.device) for _ in range(args.repeat))
            worst, frac = compare(os.path.join(work, "ww"), os.path.join(work, "mk"))
            row.update({"mergekit_s": mk, "speedup_vs_mergekit": mk / ww, "max_abs_diff": worst,
                        "frac_diff": frac})
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    cols = ["method", "size", "params_M", "read_GB", "write_GB", "io_floor_s", "wweight_s", "mergekit_s",
            "speedup_vs_mergekit", "wweight_vs_floor", "wweight_GBps", "max_abs_diff", "frac_diff"]
    md = write_results("checkpoint", dev, rows, columns=cols, title="wweight merge vs mergekit-yaml vs I/O floor",
                       extra={"note": "warm page cache; both engines in-process (imports excluded); "
                                      "wweight fsyncs its output, the floor and mergekit do not",
                              "generator": f"wweight.examples.zoo.make_llama_zoo({size!r}, n_models={args.models})"})
    print(md)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0
