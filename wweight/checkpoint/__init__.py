"""Whole-checkpoint engine: streaming sharded safetensors in, merged / aligned / quantized model out.

Modules, each usable on its own:

* :mod:`.format`    the safetensors / Hugging Face layout: names, dtypes, header parsing, sizes;
* :mod:`.reader`    :class:`Checkpoint` (validated up front, one tensor at a time: mapped copy-on-write, or ``pread``)
  and the one compatibility check shared by merge and align;
* :mod:`.writer`    :func:`plan_shards` / :class:`ShardedWriter` (headers first, preallocated files,
  tensors at their final offsets from any thread or process), :func:`save_checkpoint`;
* :mod:`.atomic`    :class:`AtomicOutputDir` and :func:`atomic_output`: every output appears
  complete or not at all (errors, Ctrl-C, SIGTERM; ``--overwrite`` by one exchange);
* :mod:`.stale`     what SIGKILL leaves beside OUT_DIR: removed on the next run when its owner is dead;
* :mod:`.plan`      :func:`plan_merge`: the whole merge validated and laid out before any compute;
* :mod:`.pipeline`  :func:`run_merge`: reader thread -> compute -> writer thread, memory-bounded;
* :mod:`.card`      ``mergekit_config.yml`` and the ``README.md`` model card of a merge;
* :mod:`.dist`      several processes under ``torchrun`` (work split, rank 0 commits);
* :mod:`.align`     ``wweight align`` (Git Re-Basin weight matching of whole checkpoints);
* :mod:`.quantize`  ``wweight quantize`` / ``dequantize``.

The command line (``wweight/cli.py``) is a thin layer over :func:`run_merge`, :func:`run_align`,
:func:`run_quantize` and :func:`run_dequantize`.
"""
from .align import build_spec, run_align
from .atomic import AtomicOutputDir, atomic_output
from .dist import split_work
from .format import CheckpointError, TensorInfo, human, parse_size, read_header
from .pipeline import run_merge
from .plan import MergePlan, WorkItem, plan_merge
from .quantize import parse_outliers, run_dequantize, run_quantize
from .reader import Checkpoint, check_compatible, load_checkpoint
from .writer import Shard, ShardedWriter, copy_side_files, plan_shards, save_checkpoint

__all__ = [
    "Checkpoint", "load_checkpoint", "check_compatible", "save_checkpoint", "plan_shards", "Shard", "ShardedWriter",
    "copy_side_files", "AtomicOutputDir", "atomic_output", "CheckpointError", "TensorInfo", "read_header",
    "parse_size", "human", "plan_merge", "MergePlan", "WorkItem", "run_merge", "split_work", "build_spec",
    "run_align", "parse_outliers", "run_quantize", "run_dequantize",
]
