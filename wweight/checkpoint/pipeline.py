"""Running a merge plan: reader thread -> compute -> writer thread, on one or several processes.

:func:`run_merge` plans (:mod:`.plan`) and executes: a reader thread prefetches the next work
items' inputs, the main thread merges on ``device`` (``wweight.merge_tensors``; iso methods on
groups of keys through ``wweight.merge_state_dicts``), a writer thread writes results at their
planned offsets. Host memory in flight is bounded by ``memory_budget``: an item (all models' tensors
of one key, or of one iso group) is admitted - its reads start - only while the costs of the items in
flight (being read, computing, queued for writing; :func:`wweight.checkpoint.costs.item_cost`, an
upper bound of all it allocates) plus its own stay within the budget; when the largest item alone
exceeds it, items run one at a time. The bound held is :attr:`MergePlan.bound` (``--dry-run``
prints it). Freed tensors go back to the OS (:func:`.costs.return_freed_memory`), so the bound holds
for the resident set too (tests/test_memory_budget.py measures the peak RSS). On CUDA the reads land in pinned
buffers, host->device and device->host copies are issued ``non_blocking`` on the current stream
and the writer thread waits on a CUDA event, so reading, compute and writing of different items
overlap (no separate copy stream: untested on a GPU in this repository's CI).
The output is Hub-ready as mergekit's: ``config.json``, tokenizer files, ``mergekit_config.yml`` and
a ``README.md`` card (:mod:`.card`).

Merges follow mergekit's dtype rules (``mergekit/plan.py``): inputs are cast to the config's
``dtype`` (default: their own dtype), merged in it, and cast to ``out_dtype`` (default: ``dtype``).
DARE / DELLA masks are seeded per tensor from ``seed`` and the tensor's name
(:func:`wweight.key_seed`, not the order of work), so the output does not depend on scheduling.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Optional

import torch

from .. import _hub as hub
from .. import _pool
from .. import methods as M
from ..config import MergeConfig
from ..sparse import key_seed
from .atomic import atomic_output, fsync_dir
from .card import warn_if_no_tokenizer, write_hub_files
from .dist import Dist, split_work
from .format import FLOATS, CheckpointError
from .costs import Ledger, return_freed_memory
from .plan import MergePlan, WorkItem, merged_inputs, per_model_value, plan_merge
from .writer import ShardedWriter, copy_side_files

def _merge_api():
    from .. import merge as _m  # resolved at call time: tests patch wweight.merge.merge_tensors

    return _m


def _merge_one(plan: MergePlan, key: str, tensors: List[torch.Tensor], backend) -> torch.Tensor:
    """One key of a per-tensor method: every parameter of the method resolved for this tensor name
    at its layer position (a model's own parameters, then its slice's, then the top-level ones, then
    the registry default; mergekit matches per-model filters against the input tensor's name)."""
    cfg = plan.config
    spec = M.get(cfg.method)
    src = plan.source(key)
    # linear: the base (when given) is one of the merged inputs, not a base
    base, fts = (tensors[0], tensors[1:]) if plan.has_base(key) else (None, tensors)
    kw: Dict[str, Any] = {}
    for p in spec.params:
        if p.inert:
            continue
        if p.scope == M.PER_MODEL:
            kw[p.api_name] = [float(per_model_value(cfg, p, k, e, src)) for e, k in merged_inputs(cfg, src, key)]
        elif p.kind is bool:
            kw[p.api_name] = cfg.resolve(p.name, key, t=src.t, slice=src.slice)  # None: the method's default
        else:
            kw[p.api_name] = float(cfg.resolve(p.name, key, None, p.default, t=src.t, slice=src.slice))
    if cfg.method == "passthrough" and kw.get("scale") == [1.0] and backend != "reference":
        # a whole-tensor passthrough at scale 1 is the tensor itself (mergekit's bits: x * 1.0 == x); the
        # pipeline owns the tensor it read, so it is written as is: no copy, no pass over it
        return fts[0]
    try:
        return _merge_api().merge_tensors(cfg.method, base, fts, seed=key_seed(plan.seed, key), backend=backend, **kw)
    except ValueError as e:
        raise _name_inputs(e, plan, key) from None


def _name_inputs(e: ValueError, plan: MergePlan, key: str) -> ValueError:
    """The op names its inputs ``tensors[i]`` / ``base``; in a checkpoint merge say which tensor of
    which model directory it is (a NaN in a model must name the key and the model)."""
    msg = str(e)
    ins = plan.key_inputs(key)
    names = {}
    if plan.has_base(key):
        names["base"], ins = ins[0], ins[1:]
    names.update({f"tensors[{i}]": x for i, x in enumerate(ins)})
    named = re.sub(r"\bbase\b|tensors\[\d+\]",
                   lambda m: f"{names[m.group(0)][1]!r} of {names[m.group(0)][0].path}" if m.group(0) in names
                   else m.group(0), msg)
    return ValueError(named if named != msg else f"{key!r}: {msg}")


def _merge_group(plan: MergePlan, keys: List[str], loaded: List[Dict[str, torch.Tensor]],
                 backend) -> Dict[str, torch.Tensor]:
    """A group of keys of an iso method (same layer position and slice): one batched
    merge_state_dicts call."""
    cfg = plan.config
    src = plan.source(keys[0])
    names = set(cfg.parameters) | set(src.slice.parameters if src.slice is not None else ())
    kw = {k: cfg.resolve(k, keys[0], t=src.t, slice=src.slice) for k in names if k != "alpha"}
    alpha = float(cfg.resolve("alpha", keys[0], None, M.ALPHA.default, t=src.t, slice=src.slice))
    if backend is not None:
        kw["backend"] = backend
    # the plan sized the group (same-shape keys) to its budget: one batch, as the plan counted it
    kw.setdefault("batch_size", len(keys))
    return _merge_api().merge_state_dicts(cfg.method, loaded[0], loaded[1:], alpha=alpha, **kw)


def run_merge(config: MergeConfig, out_dir: str, *, device="cpu", memory_budget="4GB",
              max_shard_size="5GB", overwrite: bool = False, seed: int = 0, backend: Optional[str] = None,
              dry_run: bool = False, progress: bool = True, allow_symlinks: bool = False,
              fsync: bool = True) -> Dict[str, Any]:
    """Validate, plan and run a merge into ``out_dir``; returns a summary dict (or the plan's).

    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (under torchrun ``"cuda"`` means this rank's
    ``cuda:LOCAL_RANK``). ``memory_budget``: host bytes of tensors in flight (see the module doc); the
    summary's ``memory_bound`` is the bound held (``plan.bound``). Running a merge sets glibc's
    ``M_MMAP_THRESHOLD`` for the process (:func:`wweight.checkpoint.costs.return_freed_memory`).
    """
    dist = Dist()
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but CUDA is not available")
            if dist.active and dev.index is None:
                dev = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
        plan = plan_merge(config, out_dir, device=dev, memory_budget=memory_budget,
                          max_shard_size=max_shard_size, overwrite=overwrite, seed=seed,
                          allow_symlinks=allow_symlinks, backend=backend)
        if dry_run:
            return {"plan": plan, "dry_run": True}
        return _execute(plan, dist, backend=backend, progress=progress, fsync=fsync)
    finally:
        dist.close()


def _execute(plan: MergePlan, dist: Dist, *, backend, progress, fsync) -> Dict[str, Any]:
    out = plan.output
    t0 = time.perf_counter()
    mine = split_work([it.in_bytes + it.out_bytes for it in plan.items], dist.world)[dist.rank]
    items = [plan.items[i] for i in mine]
    stats = {"read": 0, "written": 0, "tensors": 0}
    error: Optional[BaseException] = None

    token = dist.broadcast(uuid.uuid4().hex[:12] if dist.rank == 0 else None)
    try:
        with atomic_output(out, token, owner=dist.rank == 0) as tmp:
            if dist.rank == 0:
                failed = False
                try:
                    writer = ShardedWriter(tmp, plan.shards, create=True)
                except BaseException as e:
                    failed, error = True, e
                if dist.any_failed(failed):
                    raise error or CheckpointError("another rank failed")
            else:
                if dist.any_failed(False):
                    raise CheckpointError("rank 0 failed to create the output")
                writer = ShardedWriter(tmp, plan.shards, create=False)
            try:
                _pipeline(plan, items, writer, stats, backend=backend, progress=progress and dist.rank == 0)
                writer.close(fsync=fsync)
            except BaseException as e:  # noqa: BLE001 - reported below, after the other ranks agree
                error = e
                with contextlib.suppress(Exception):
                    writer.close(fsync=False)
            if dist.any_failed(error is not None):
                raise error or CheckpointError("another rank failed; nothing was written")
            commit_error: Optional[BaseException] = None
            if dist.rank == 0:
                try:
                    missing = [k for it in items for k in it.keys if k not in writer.written]
                    if missing and not dist.active:
                        raise CheckpointError(f"internal: tensor {missing[0]!r} was not written")
                    writer.write_index()
                    ref = plan.base or plan.models[0]
                    tok = plan.config.tokenizer_source
                    tok = hub.resolve(tok, "tokenizer_source")[0] if tok else tok   # a Hub id -> its snapshot
                    copied = copy_side_files(tok, tmp, config_src=ref.path,
                                             torch_dtype=_common(plan.out_dtype.values()),
                                             extra_config=plan.extra_config or None,
                                             allow_symlinks=ref.allow_symlinks)
                    write_hub_files(plan.config, tmp)
                    warn_if_no_tokenizer(copied, plan.config.tokenizer_source, plan.out_dir)
                    if fsync:
                        fsync_dir(tmp)
                    out.commit()
                except BaseException as e:  # noqa: BLE001 - let the other ranks leave the barrier first
                    commit_error = e
            if dist.any_failed(commit_error is not None):
                raise commit_error or CheckpointError("rank 0 failed to commit the output")
    finally:
        for ck in plan.inputs:
            ck.close()
    secs = time.perf_counter() - t0
    summary = {"out_dir": plan.out_dir, "tensors": len(plan.keys), "tensors_this_rank": stats["tensors"],
               "shards": len(plan.shards), "bytes_read": plan.bytes_in, "bytes_written": plan.bytes_out,
               "seconds": secs, "rank": dist.rank, "world_size": dist.world,
               "memory_budget": plan.memory_budget, "memory_bound": plan.bound, "memory_line": plan.memory_line()}
    return summary


def _common(dts: Iterable[torch.dtype]) -> Optional[torch.dtype]:
    """The output dtype recorded in config.json: the most common floating dtype."""
    floats = [d for d in dts if d in FLOATS]
    return Counter(floats).most_common(1)[0][0] if floats else None


def _pipeline(plan: MergePlan, items: List[WorkItem], writer: ShardedWriter, stats, *, backend, progress) -> None:
    """Reader thread -> compute (this thread) -> writer thread, as many items in flight as the budget
    allows (each item's cost reserved from the start of its reads until its output is written)."""
    dev = plan.device
    cuda = dev.type == "cuda"
    inputs = plan.inputs
    if not cuda:
        return_freed_memory()
    ledger = Ledger(plan.memory_budget, serial=plan.largest > plan.memory_budget)
    # CPU: buffers recycled between items (wweight/_pool.py): no fresh pages to fault in and zero for
    # every read and every output; at most two of the largest items' worth kept, within the bound
    pool = None if cuda else _pool.BufferPool(min(plan.bound, 2 * plan.largest))

    # The models' tensors of one item are read concurrently (pread releases the GIL): one thread
    # per input model, at most 4 - NVMe drives need several requests in flight to reach full speed.
    io_pool = ThreadPoolExecutor(max(1, min(4, len(inputs))), thread_name_prefix="wweight-io")

    def load(it: WorkItem):
        futs = [[io_pool.submit(ck.read, name, pin=cuda) for ck, name in plan.key_inputs(k)] for k in it.keys]
        return [[f.result() for f in row] for row in futs]

    def compute(it: WorkItem, data):
        """``data``: per key, the inputs' tensors; emptied here (the inputs are freed as soon as the
        merge no longer needs them, not when the caller lets go)."""
        outs: Dict[str, torch.Tensor] = {}
        if it.kind == "copy":
            k = it.keys[0]
            ts = data[0]
            cks = [ck for ck, _ in plan.key_inputs(k)]
            for i, t in enumerate(ts[1:], 1):
                if not torch.equal(t, ts[0]):
                    raise CheckpointError(f"tensor {k!r} is not floating point ({ts[0].dtype}) and differs "
                                          f"between {cks[0].what} and {cks[i].what}; cannot merge it")
            outs[k] = ts[0]
            data.clear()
            return outs, None
        cd = plan.compute_dtype
        reads = []   # read buffers the merge uses as they are (no dtype cast): back to the pool after it
        moved = []
        for k, ts in zip(it.keys, data):
            row = []
            for i in range(len(ts)):
                row.append(ts[i].to(dev, non_blocking=True).to(cd[k]))
                if pool is not None and row[-1] is ts[i]:
                    reads.append(ts[i])
                if not cuda:
                    ts[i] = None   # the read buffer goes when its copy exists (CUDA: until the copy ran)
            moved.append(row)
        row = ts = None   # only ``moved`` (and ``reads``) hold the tensors now
        data.clear()
        if it.kind == "merge":
            k = it.keys[0]
            outs[k] = _merge_one(plan, k, moved[0], backend)
        else:
            n = len(moved[0])
            sds = [{k: moved[j][i] for j, k in enumerate(it.keys)} for i in range(n)]
            res = _merge_group(plan, it.keys, sds, backend)
            del sds
            for k in it.keys:
                if k not in res:
                    raise CheckpointError(f"merge_state_dicts returned no tensor {k!r}")
                outs[k] = res[k]
            del res
        moved.clear()
        if pool is not None:   # the read buffers nothing else holds go back to the pool
            pool.give(reads)
        for k in list(outs):
            o = outs.pop(k)
            o = o.to(plan.out_dtype[k])
            if cuda:
                host = torch.empty(o.shape, dtype=o.dtype, pin_memory=True)
                host.copy_(o, non_blocking=True)
                o = host
            outs[k] = o
            del o
        if cuda:
            ev = torch.cuda.Event()
            ev.record()
            return outs, ev
        return outs, None

    def write(it: WorkItem, result):
        outs, ev = result
        if ev is not None:
            ev.synchronize()
        n = 0
        for k in it.keys:
            n += writer.write(k, outs[k])
        if pool is not None:   # the written outputs nothing else holds go back to the pool
            pool.give([outs.pop(k) for k in list(outs)])
        outs.clear()   # the output is freed here, before the ledger releases it
        return n

    bar, overhead = None, 0
    if progress:
        from tqdm import tqdm

        # the summary's figures (plan.bytes_in / bytes_out) also count the shard headers: add them when
        # this process writes every item, so the bar ends at the summary's total
        overhead = (plan.bytes_in + plan.bytes_out) - sum(i.in_bytes + i.out_bytes for i in plan.items)
        overhead = overhead if len(items) == len(plan.items) and overhead > 0 else 0
        bar = tqdm(total=sum(i.in_bytes + i.out_bytes for i in items) + overhead, unit="B", unit_scale=True,
                   desc=f"wweight {plan.config.method}", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5, leave=False, disable=None)  # disable=None: no bar off a TTY
    t0 = time.perf_counter()
    loads: deque = deque()
    writes: deque = deque()
    pending = deque(items)
    done_tensors = 0
    n_tensors = sum(len(i.keys) for i in items)

    def fill(rd_pool):
        while pending:
            if pool is not None:   # the pool's buffers are resident: they count against the bound
                pool.trim(plan.bound - ledger.used - pending[0].cost)
            if not ledger.admit(pending[0].cost):
                break
            nxt = pending.popleft()
            loads.append((nxt, rd_pool.submit(load, nxt)))

    def retire(block: bool):
        """Account the finished writes (all of the oldest one's when ``block``); their bytes go back."""
        nonlocal done_tensors
        while writes and (block or writes[0][1].done()):
            block = False
            it, fut = writes.popleft()
            fut.result()
            ledger.release(_held(it), done=True)
            stats["written"] += it.out_bytes
            done_tensors += len(it.keys)
            if bar is not None:   # the read half was counted when the item's inputs arrived
                bar.update(it.out_bytes)
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{done_tensors}/{n_tensors} tensors, {done_tensors / el:.1f}/s", refresh=False)

    with ThreadPoolExecutor(1, thread_name_prefix="wweight-read") as rd, \
            ThreadPoolExecutor(1, thread_name_prefix="wweight-write") as wr, _pool.active(pool):
        try:
            fill(rd)
            while loads or writes:
                if not loads:          # the next item does not fit yet: wait for the oldest write
                    retire(block=True)
                    fill(rd)
                    continue
                it, fut = loads.popleft()
                data = fut.result()
                stats["read"] += it.in_bytes
                if bar is not None:   # bytes read count as soon as they are in memory, not at the write
                    bar.update(it.in_bytes)
                with torch.no_grad():
                    result = compute(it, data)
                del data
                # the compute's temporaries are gone: only the output stays reserved until written
                ledger.release(it.cost - _held(it))
                writes.append((it, wr.submit(write, it, result)))
                del result
                stats["tensors"] += len(it.keys)
                retire(block=False)
                fill(rd)
            if bar is not None and overhead:
                bar.update(overhead)
        except BaseException:
            for _, f in list(loads) + list(writes):
                f.cancel()
            raise
        finally:
            io_pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()


def _held(it: WorkItem) -> int:
    """Bytes an item keeps reserved after its compute: its output until it is written (a copy item's
    output is one of its read buffers)."""
    return min(it.cost, it.out_bytes)
