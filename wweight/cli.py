"""``wweight`` command line: merge | align | quantize | dequantize | demo.

Every failure is one line on stderr (``wweight: error: ...``), a non-zero exit status and nothing
under OUT_DIR (outputs are written beside it and renamed into place; see ``wweight.checkpoint``).
``WWEIGHT_DEBUG=1`` shows the traceback of unexpected errors.

Exit status: 0 success, 1 error, 2 bad command line, 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

_DEBUG = os.environ.get("WWEIGHT_DEBUG", "") not in ("", "0")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(2, f"wweight: error: {message} (see `{self.prog} --help`)\n")


def _common_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard (default 5GB; e.g. 500MB, 2GiB)")
    p.add_argument("--allow-symlinks", action="store_true",
                   help="follow shard/config symlinks that leave the model directory (HF cache snapshots)")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync of the output before the final rename")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar / plan, only errors")


def _methods_epilog() -> str:
    """The merge methods and their parameters, from the method registry (wweight.methods)."""
    from . import methods as M

    lines = ["merge methods (mergekit's names; parameters: per model | shared):"]
    for name in M.registered():
        m = M.get(name)
        per, shared = ", ".join(m.names(M.PER_MODEL)) or "-", ", ".join(m.names(M.SHARED)) or "-"
        lines.append(f"  {name:<18} {per} | {shared}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wweight", description="Merge, align and quantize whole checkpoints (safetensors).")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    m = sub.add_parser("merge", help="merge models from a mergekit-style YAML config",
                       description="Merge models from a mergekit-style YAML config into OUT_DIR (Hugging Face\n"
                                   "layout, sharded safetensors).",
                       epilog=_methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", metavar="CONFIG.yaml")
    m.add_argument("out_dir", metavar="OUT_DIR")
    m.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    m.add_argument("--memory-budget", default="4GB", metavar="SIZE",
                   help="bytes of tensors in flight (prefetch depth, iso group size; default 4GB)")
    m.add_argument("--dry-run", action="store_true", help="validate and print the plan, write nothing")
    m.add_argument("--random-seed", "--seed", dest="seed", type=int, default=0,
                   help="seed of the DARE/DELLA masks (per tensor: seed + tensor name; default 0)")
    m.add_argument("--backend", default=None, choices=["auto", "cuda", "triton", "torch", "reference"],
                   help="force a kernel backend")
    _common_out(m)

    a = sub.add_parser("align", help="permute MODEL_B's hidden units onto MODEL_A (Git Re-Basin weight matching)",
                       description="Weight matching of MODEL_B onto MODEL_A; writes the permuted MODEL_B.")
    a.add_argument("spec", metavar="SPEC_OR_ARCH",
                   help="'auto' (config.json's architectures, built-in specs only: a model file never picks code "
                        "to import), an architecture name (mlp, gpt2, llama, or a Hugging Face class such as "
                        "LlamaForCausalLM), or module:function returning a spec (imported: only name your own)")
    a.add_argument("model_a", metavar="MODEL_A")
    a.add_argument("model_b", metavar="MODEL_B")
    a.add_argument("out_dir", metavar="OUT_DIR")
    a.add_argument("--max-iter", type=int, default=100)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="cpu")
    a.add_argument("--dry-run", action="store_true")
    _common_out(a)

    q = sub.add_parser("quantize", help="blockwise quantization with outlier preservation",
                       description="Quantize MODEL_DIR into OUT_DIR (wweight quantized safetensors layout).")
    q.add_argument("model_dir", metavar="MODEL_DIR")
    q.add_argument("out_dir", metavar="OUT_DIR")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--block-size", type=int, default=64)
    q.add_argument("--outliers", default="none",
                   help="outlier handling passed to wweight.quantize_state_dict (e.g. none, super, "
                        "a fraction such as 0.001)")
    q.add_argument("--skip", action="append", default=None, metavar="SUBSTRING",
                   help="keep tensors whose name contains SUBSTRING unquantized (repeatable)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dry-run", action="store_true")
    _common_out(q)

    d = sub.add_parser("dequantize", help="turn a quantized checkpoint back into a plain one")
    d.add_argument("model_dir", metavar="QUANTIZED_DIR")
    d.add_argument("out_dir", metavar="OUT_DIR")
    d.add_argument("--dtype", default=None, help="output dtype (default: as recorded at quantization)")
    _common_out(d)

    e = sub.add_parser("demo", help="build a small digits model zoo and merge it (offline, < 1 min)")
    e.add_argument("--workdir", default=None, help="where to build the zoo (default: a temporary directory)")
    e.add_argument("--tasks", type=int, default=5, help="number of fine-tuned models (default 5)")
    e.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    return p


def _cmd_merge(args) -> int:
    from .checkpoint.format import DRY_RUN_NOTE, human
    from .checkpoint import run_merge
    from .config import load_config

    cfg = load_config(args.config)
    res = run_merge(cfg, args.out_dir, device=args.device, memory_budget=args.memory_budget,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite, seed=args.seed,
                    backend=args.backend, dry_run=args.dry_run, progress=not args.quiet,
                    allow_symlinks=args.allow_symlinks, fsync=not args.no_fsync)
    if args.dry_run:
        print(res["plan"].describe())
        print(DRY_RUN_NOTE)
        return 0
    if res["rank"] == 0 and not args.quiet:
        s = res["seconds"]
        io = res["bytes_read"] + res["bytes_written"]
        print(f"wweight: merged {res['tensors']} tensors with {cfg.method} in {s:.2f} s "
              f"({res['tensors'] / max(s, 1e-9):.1f} tensors/s, {io / max(s, 1e-9) / 1e9:.2f} GB/s read+write; "
              f"read {human(res['bytes_read'])}, wrote {human(res['bytes_written'])} in {res['shards']} shard(s)"
              + (f", {res['world_size']} ranks" if res["world_size"] > 1 else "") + f") -> {res['out_dir']}")
    return 0


def _cmd_align(args) -> int:
    from .checkpoint import run_align

    res = run_align(args.spec, args.model_a, args.model_b, args.out_dir, max_iter=args.max_iter,
                    seed=args.seed, device=args.device, overwrite=args.overwrite, dry_run=args.dry_run,
                    max_shard_size=args.max_shard_size, allow_symlinks=args.allow_symlinks,
                    fsync=not args.no_fsync)
    if not args.quiet:
        print(res["message"])
    return 0


def _cmd_quantize(args) -> int:
    from .checkpoint import run_quantize

    res = run_quantize(args.model_dir, args.out_dir, bits=args.bits, block_size=args.block_size,
                       outliers=args.outliers, skip=args.skip, device=args.device, overwrite=args.overwrite,
                       dry_run=args.dry_run, max_shard_size=args.max_shard_size, allow_symlinks=args.allow_symlinks, fsync=not args.no_fsync)
    if not args.quiet:
        print(res["message"])
    return 0


def _cmd_dequantize(args) -> int:
    from .checkpoint import run_dequantize

    res = run_dequantize(args.model_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                         max_shard_size=args.max_shard_size, allow_symlinks=args.allow_symlinks,
                         fsync=not args.no_fsync)
    if not args.quiet:
        print(res["message"])
    return 0


def _cmd_demo(args) -> int:
    from .examples.zoo import run_demo

    run_demo(workdir=args.workdir, n_tasks=args.tasks, keep=args.keep)
    return 0


_COMMANDS = {"merge": _cmd_merge, "align": _cmd_align, "quantize": _cmd_quantize,
             "dequantize": _cmd_dequantize, "demo": _cmd_demo}


_MAX_ERROR = 500


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    first = msg.splitlines()[0] if msg else type(e).__name__
    if len(first) > _MAX_ERROR:  # a value echoed from a hostile input must not flood the terminal
        first = f"{first[:_MAX_ERROR]}... ({len(first) - _MAX_ERROR} more characters)"
    return first


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``wweight`` console script and ``python -m wweight``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error (already printed on one line)
        return int(e.code or 0)
    if getattr(args, "version", False) and not args.command:
        from . import __version__

        print(f"wweight {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("wweight: interrupted; nothing was written to OUT_DIR", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError, ImportError, KeyError) as e:
        if _DEBUG:
            raise
        from .checkpoint import CheckpointError
        from .config import ConfigError

        prefix = "" if isinstance(e, (CheckpointError, ConfigError, ValueError, TypeError)) else f"{type(e).__name__}: "
        print(f"wweight: error: {prefix}{_one_line(e)}", file=sys.stderr)
        return 1
    except SystemExit as e:  # SIGTERM turned into SystemExit by the engine: files are cleaned up
        code = e.code if isinstance(e.code, int) else 1
        print(f"wweight: stopped (exit {code}); nothing was written to OUT_DIR", file=sys.stderr)
        return code
    except Exception as e:  # a bug: still one line unless WWEIGHT_DEBUG=1
        if _DEBUG:
            raise
        print(f"wweight: error: unexpected {type(e).__name__}: {_one_line(e)} "
              "(set WWEIGHT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
