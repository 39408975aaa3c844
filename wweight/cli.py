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


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default shown next to its help; epilogs (the method table) kept as written."""


def _block_size(v: str):
    """``--block-size``: a positive int, ``row`` (one block per row) or ``tensor`` (one block), as the API."""
    if v.lower() in ("row", "tensor"):
        return v.lower()
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, 'row' or 'tensor', got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, 'row' or 'tensor', got {v!r}")
    return n


def _common_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard (e.g. 500MB, 2GiB)")
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
    fmt = {"formatter_class": _Help}

    m = sub.add_parser("merge", help="merge models from a mergekit-style YAML config",
                       description="Merge models from a mergekit-style YAML config into OUT_DIR (Hugging Face\n"
                                   "layout, sharded safetensors).",
                       epilog=_methods_epilog(), **fmt)
    m.add_argument("config", metavar="CONFIG.yaml", help="mergekit-style merge config")
    m.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created atomically)")
    m.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    m.add_argument("--memory-budget", default="4GB", metavar="SIZE",
                   help="bound on the host memory the merge's tensors take above the start (reads, compute "
                        "copies, temporaries, outputs queued for writing; one work item at least: --dry-run "
                        "prints the bound held)")
    m.add_argument("--dry-run", action="store_true", help="validate and print the plan, write nothing")
    m.add_argument("--random-seed", "--seed", dest="seed", type=int, default=0,
                   help="seed of the DARE/DELLA masks (per tensor: seed + tensor name)")
    m.add_argument("--backend", default=None, choices=["auto", "cuda", "triton", "cpu", "torch", "reference"],
                   help="force a kernel backend (None = auto; cpu = the C++/OpenMP kernels of the sparse "
                        "methods, CPU tensors)")
    _common_out(m)

    a = sub.add_parser("align", help="permute MODEL_B's hidden units onto MODEL_A (Git Re-Basin weight matching)",
                       description="Weight matching of MODEL_B onto MODEL_A; writes the permuted MODEL_B.", **fmt)
    a.add_argument("spec", metavar="SPEC_OR_ARCH",
                   help="'auto' (config.json's architectures, built-in specs only: a model file never picks code "
                        "to import), an architecture name (mlp, gpt2, llama, or a Hugging Face class such as "
                        "LlamaForCausalLM), or module:function returning a spec (imported: only name your own)")
    a.add_argument("model_a", metavar="MODEL_A", help="reference model (left unchanged)")
    a.add_argument("model_b", metavar="MODEL_B", help="model whose hidden units are permuted onto MODEL_A")
    a.add_argument("out_dir", metavar="OUT_DIR", help="output directory: permuted MODEL_B + permutations.safetensors")
    a.add_argument("--max-iter", type=int, default=100, help="maximum weight-matching rounds")
    a.add_argument("--seed", type=int, default=0, help="seed of the random order of the permutations per round")
    a.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (where the costs are computed)")
    a.add_argument("--dry-run", action="store_true", help="validate and print the plan, write nothing")
    _common_out(a)

    q = sub.add_parser("quantize", help="blockwise quantization with outlier preservation",
                       description="Quantize MODEL_DIR into OUT_DIR (wweight quantized safetensors layout).\n"
                                   "Use the result with `wweight dequantize OUT_DIR PLAIN_DIR` (a loadable\n"
                                   "Hugging Face checkpoint again) or wweight.load_quantized(file).", **fmt)
    q.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (safetensors)")
    q.add_argument("out_dir", metavar="OUT_DIR", help="output directory (quantized-*.safetensors, quantization.json)")
    q.add_argument("--bits", type=int, default=4, help="bits per code, 2..8")
    q.add_argument("--block-size", type=_block_size, default=64,
                   help="elements per scale: a positive integer, 'row' (one block per row) or 'tensor'")
    q.add_argument("--outliers", default="none",
                   help="weights kept exact: none, a fraction in (0, 1) such as 0.001 (largest |w|), or "
                        "zscore:Z. Super weights need their coordinates: use the Python API "
                        "(quantize_state_dict(super_weights=known_super_weights(name)))")
    q.add_argument("--skip", action="append", default=None, metavar="SUBSTRING",
                   help="keep tensors whose name contains SUBSTRING unquantized (repeatable)")
    q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    q.add_argument("--dry-run", action="store_true", help="validate and print the plan, write nothing")
    _common_out(q)

    d = sub.add_parser("dequantize", help="turn a quantized checkpoint back into a plain one",
                       description="Turn the output of `wweight quantize` back into a plain Hugging Face\n"
                                   "checkpoint (sharded safetensors) that transformers can load.", **fmt)
    d.add_argument("model_dir", metavar="QUANTIZED_DIR", help="directory written by `wweight quantize`")
    d.add_argument("out_dir", metavar="OUT_DIR", help="output directory (plain checkpoint)")
    d.add_argument("--dtype", default=None,
                   help="output dtype, e.g. bfloat16 (None: each tensor's dtype recorded at quantization)")
    _common_out(d)

    e = sub.add_parser("demo", help="build a small digits model zoo and merge it (offline, < 1 min)", **fmt)
    e.add_argument("--workdir", default=None, help="where to build the zoo (None: a temporary directory)")
    e.add_argument("--tasks", type=int, default=5, help="number of fine-tuned models")
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
        print(f"wweight: memory {res['memory_line']}")
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


QUANT_USAGE = ("use it with `wweight dequantize {out} PLAIN_DIR` (a plain checkpoint transformers can load) "
               "or in Python: wweight.load_quantized(file) -> wweight.dequantize_state_dict(...)")


def _cmd_quantize(args) -> int:
    from .checkpoint import run_quantize

    if str(args.outliers).lower() == "super":
        raise ValueError("--outliers super is not available on the command line: super weights need their "
                         "coordinates, from wweight.known_super_weights(model_name) or wweight.find_super_weights "
                         "(a forward pass); pass them to wweight.quantize_state_dict(super_weights=...)")

    res = run_quantize(args.model_dir, args.out_dir, bits=args.bits, block_size=args.block_size,
                       outliers=args.outliers, skip=args.skip, device=args.device, overwrite=args.overwrite,
                       dry_run=args.dry_run, max_shard_size=args.max_shard_size, allow_symlinks=args.allow_symlinks, fsync=not args.no_fsync)
    if not args.quiet:
        print(res["message"])
        if not args.dry_run:
            print("wweight: " + QUANT_USAGE.format(out=args.out_dir))
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
