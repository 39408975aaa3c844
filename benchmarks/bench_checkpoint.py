"""Whole-checkpoint merge benchmark: ``wweight merge`` vs ``mergekit-yaml`` vs the I/O floor.

``python -m benchmarks checkpoint [--quick] [--size 125m|1b|7b] [--device cpu|cuda] [--methods ...]``

1. Generates a Llama-shaped random checkpoint (``wweight.examples.zoo.make_llama_zoo``: a base and
   ``--models`` fine-tunes, bf16, sharded like Hugging Face) under ``--workdir`` (default: a temp dir).
2. The I/O floor per method (:func:`benchmarks.io_floor.io_floor`): ``pread`` every byte of the input shards the
   method reads into one reused buffer and ``pwrite`` one output-sized file (same disk, same
   page-cache state as the merges), and separately the ``fsync`` of that file. Since the reader maps
   large tensors instead of copying them, also the floor of a mapping reader (:func:`mapped_floor`:
   map the inputs, load every byte once, ``pwrite`` the output), which is lower. Earlier runs used
   ``safetensors`` ``load_file`` / ``save_file`` (:func:`st_floor`, still reported), which maps the
   inputs lazily and never reads them: that "floor" was the time to write one model.
3. For each method (default ties, dare_ties, linear; 3 models): the same YAML through
   ``wweight.checkpoint.run_merge`` (in a child process set up as ``wweight merge`` is, with and
   without fsync, and in this process) and through mergekit's engine (``mergekit.merge.run_merge``,
   what ``mergekit-yaml`` runs, in this process), interpreter and import time excluded, on
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
import os
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.common import write_results
from benchmarks.io_floor import _read_all, io_floor, mapped_floor, st_floor


def _yaml(path, method, base, models, dtype):
    import yaml

    cfg = _cfg(method)({"base": base, "models": models}, dtype)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def _layers(z):
    return int(z["config"]["num_hidden_layers"]) if "config" in z else \
        1 + max(int(k.split(".")[2]) for k, _ in z["shapes"] if k.startswith("model.layers."))


def _cfg(method):
    """Config builder (zoo, dtype) -> dict of the in-process benchmark (:func:`_yaml`) and the CLI one:
    weight 1 and density 0.5 per model (linear: weights 1/K, no base)."""
    def build(z, dt):
        params = {"weight": 1.0 / len(z["models"])} if method == "linear" else {"weight": 1.0, "density": 0.5}
        cfg = {"merge_method": method}
        if method != "linear":
            cfg["base_model"] = z["base"]
        cfg["models"] = [{"model": m, "parameters": dict(params)} for m in z["models"]]
        cfg["dtype"] = dt
        return cfg
    return build


#: (name, config builder(zoo, dtype)): one line per CLI config; a config ``wweight merge`` refuses is
#: reported as skipped with its error.
CLI_CONFIGS = [
    ("ties", _cfg("ties")),
    ("linear", _cfg("linear")),
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


def run_wweight(cfg_path, out_dir, device, fsync=True):
    """The library call, in this process (OpenMP's default wait policy)."""
    from wweight.checkpoint import run_merge
    from wweight.config import load_config

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    run_merge(load_config(cfg_path), out_dir, device=device, progress=False, overwrite=True, fsync=fsync)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


_CHILD = """
import json, shutil, sys, time
import torch
from wweight.checkpoint import run_merge
from wweight.config import load_config
cfg, out, dev, fsync, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
ts = []
for _ in range(n):
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run_merge(load_config(cfg), out, device=dev, progress=False, overwrite=True, fsync=fsync)
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()
    ts.append(time.perf_counter() - t0)
print(json.dumps(ts))
"""


def run_wweight_cli_env(cfg_path, out_dir, device, repeat, fsync=True):
    """``run_merge`` timed in a child process set up as ``wweight merge`` sets itself up (OpenMP's
    passive wait policy, see ``wweight/__init__.py``; imports excluded): per-run seconds."""
    import json
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    r = subprocess.run([sys.executable, "-c", _CHILD, cfg_path, out_dir, device, "1" if fsync else "0", str(repeat)],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"wweight child exited {r.returncode}: {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    old_floor = st_floor(inputs, os.path.join(work, "floor"))
    floor, fsync_s = io_floor(inputs, model_bytes, os.path.join(work, "floor"))
    print(f"llama-{size}: {n_params / 1e6:.0f}M params, {model_bytes / 1e9:.2f} GB per model, generated in "
          f"{gen_s:.1f} s; I/O floor (read {len(inputs)} models, write 1) {floor:.2f} s (+ fsync {fsync_s:.2f} s); "
          f"safetensors load_file/save_file {old_floor:.2f} s", flush=True)
    if args.cli:
        args.size_used = size
        cli_main(args, z, work, inputs, floor)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        cfg = _yaml(os.path.join(work, f"{method}.yaml"), method, z["base"], z["models"], args.dtype)
        ins = inputs if method != "linear" else list(z["models"])
        n_in = len(ins)
        m_floor, m_fsync = min(io_floor(ins, model_bytes, os.path.join(work, "floor")) for _ in range(3))
        mapped = min(mapped_floor(ins, model_bytes, os.path.join(work, "floor")) for _ in range(3))
        out = os.path.join(work, "ww")
        cli = statistics.median(run_wweight_cli_env(cfg, out, args.device, args.repeat))
        cli_nofsync = statistics.median(run_wweight_cli_env(cfg, out, args.device, args.repeat, fsync=False))
        inproc = statistics.median(run_wweight(cfg, out, args.device) for _ in range(args.repeat))
        row = {"method": method, "size": size, "models": args.models, "device": args.device,
               "dtype": args.dtype, "params_M": round(n_params / 1e6, 1),
               "read_GB": round(n_in * model_bytes / 1e9, 3), "write_GB": round(model_bytes / 1e9, 3),
               "io_floor_s": m_floor, "fsync_s": m_fsync, "st_floor_s": old_floor,
               "wweight_s": cli, "wweight_nofsync_s": cli_nofsync, "wweight_inproc_s": inproc,
               "wweight_GBps": (n_in + 1) * model_bytes / cli / 1e9,
               "wweight_vs_floor": cli / (m_floor + m_fsync), "nofsync_vs_floor": cli_nofsync / m_floor,
               "mapped_floor_s": mapped, "nofsync_vs_mapped_floor": cli_nofsync / mapped}
        if not args.no_mergekit:
            mk = statistics.median(run_mergekit(cfg, os.path.join(work, "mk"), args.device) for _ in range(args.repeat))
            worst, frac = compare(out, os.path.join(work, "mk"))
            row.update({"mergekit_s": mk, "speedup_vs_mergekit": mk / cli, "max_abs_diff": worst,
                        "frac_diff": frac})
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    cols = ["method", "size", "params_M", "read_GB", "write_GB", "io_floor_s", "fsync_s", "wweight_s",
            "wweight_vs_floor", "wweight_nofsync_s", "nofsync_vs_floor", "mapped_floor_s", "nofsync_vs_mapped_floor",
            "wweight_inproc_s", "mergekit_s",
            "speedup_vs_mergekit", "wweight_GBps", "st_floor_s", "max_abs_diff", "frac_diff"]
    md = write_results("checkpoint", dev, rows, columns=cols, title="wweight merge vs mergekit-yaml vs I/O floor",
                       extra={"note": "warm page cache, imports excluded, median of --repeat runs. io_floor_s: pread "
                                      "every input byte the method reads into one reused buffer + pwrite the "
                                      "output's bytes (no fsync); fsync_s: fsync of that file. wweight_s: "
                                      "run_merge with fsync (the default), in a child process set up as "
                                      "`wweight merge` sets itself up (OMP_WAIT_POLICY=PASSIVE); "
                                      "wweight_vs_floor = wweight_s / (io_floor_s + fsync_s); wweight_nofsync_s: "
                                      "the same without fsync, nofsync_vs_floor = it / io_floor_s; "
                                      "mapped_floor_s: map every input shard and load each byte once (int64 "
                                      "sum) + pwrite the output (no fsync), the floor of a reader that maps "
                                      "its inputs as wweight's does for tensors >= 1 MB, which skips "
                                      "io_floor_s's pread copy; nofsync_vs_mapped_floor = wweight_nofsync_s / it; "
                                      "wweight_inproc_s: the library call in the benchmark process (OpenMP's "
                                      "default policy, fsync); mergekit_s: mergekit's run_merge in the benchmark "
                                      "process (no fsync); st_floor_s: safetensors load_file + save_file, the "
                                      "floor of earlier runs, which never touches the lazily mapped inputs",
                              "generator": f"wweight.examples.zoo.make_llama_zoo({size!r}, n_models={args.models})"})
    print(md)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0
