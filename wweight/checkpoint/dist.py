"""Several processes on one merge (``torchrun --nproc-per-node N``, ``WORLD_SIZE > 1``).

The work items are split over ranks (largest first, to the least-loaded rank, deterministic) with
``torch.distributed`` (gloo for the few control messages; the tensors go through the shared output
files), rank ``r`` computes on ``cuda:LOCAL_RANK``, and rank 0 commits. Output is byte-identical
to the single-process run.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Sequence

import torch

class Dist:
    """Rank / world size and a gloo group for the few control messages (no tensors travel)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.group = None
        self._owns = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self._owns = True
                self.group = None
            elif dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def any_failed(self, failed: bool) -> bool:
        if not self.active:
            return failed
        import torch.distributed as dist

        t = torch.tensor([1 if failed else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self):
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self):
        if self._owns:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def split_work(costs: Sequence[int], world: int) -> List[List[int]]:
    """Indices of work items per rank: largest first to the least-loaded rank (deterministic)."""
    loads = [0] * world
    out: List[List[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += costs[i]
    return [sorted(o) for o in out]
