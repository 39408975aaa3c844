"""Host buffers recycled between the checkpoint engine's work items (CPU merges only).

A merge of a checkpoint reads every tensor of every model into a fresh buffer and writes every
output from a fresh one. Fresh memory costs a page fault per 4 KB page and the kernel zeroes
each page first: on the 2-core CI machine that was about a fifth of a 125M-parameter merge's CPU
samples (``clear_page_erms``, ``do_anonymous_page``), and an LLM's layers repeat the same
tensor sizes, so the buffers of one layer fit the next. While :func:`active` holds a
:class:`BufferPool`, the reader (:meth:`wweight.checkpoint.Checkpoint.read`) and the CPU kernels'
outputs (:func:`wweight._ext.empty_like`) take a buffer of exactly the size they need from it;
the engine gives buffers back (:meth:`BufferPool.give`) once nothing else references them.

Safety: a tensor is taken into the pool only when nothing else can reach its memory: no other
Python reference to the tensor object and no other tensor on its storage (the storage use count
equals that of a lone tensor, calibrated at import; if torch ever counts differently the pool
stays empty), and not a tensor marked :func:`not_poolable` (a mapped input, which must be unmapped
when it is freed, not kept to be read into). Memory: the pool's bytes are resident, so the engine
counts them against its memory budget and trims the pool before admitting work
(:meth:`BufferPool.trim`).
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator, List, Optional, Tuple

import torch

#: below this a tensor comes from malloc's heap (no fresh pages to avoid): not pooled
MIN_BYTES = 1 << 20


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _calibrate() -> Optional[int]:
    """The storage use count of a tensor that alone owns its storage, or None (pooling off) when a
    second tensor on the same storage is not counted."""
    try:
        x = torch.empty(16, dtype=torch.uint8)
        lone = _use_count(x)
        y = x.view(torch.int16)
        shared = _use_count(x)
        del y
        return lone if shared == lone + 1 and _use_count(x) == lone else None
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the counter
        return None


_LONE = _calibrate()
_ACTIVE: Optional["BufferPool"] = None
_MARK = "_wweight_not_poolable"


def not_poolable(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as memory no pool may keep (e.g. a copy-on-write file mapping,
    :mod:`wweight.checkpoint.reader`); returns ``t``. The mark is an attribute of this tensor object,
    not of its storage: a view of it made later is not marked, and if only such a view were given
    back, the pool would keep the mapping as a buffer (private memory: correct, only not unmapped
    while the pool holds it); the engine gives back the tensors the reader returned."""
    setattr(t, _MARK, True)
    return t


class BufferPool:
    """Free host buffers by exact byte size (flat ``uint8`` tensors), thread-safe. ``cap``: bytes
    it keeps at most (the oldest given go first)."""

    def __init__(self, cap: int):
        self.cap = int(cap)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._free: List[Tuple[int, torch.Tensor]] = []   # (nbytes, buffer), oldest first
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Optional[torch.Tensor]:
        """A free ``uint8`` buffer of exactly ``nbytes`` (its old contents), or None."""
        if nbytes < MIN_BYTES:
            return None
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):   # newest first: its pages are the warmest
                if self._free[i][0] == nbytes:
                    self.nbytes -= nbytes
                    self.hits += 1
                    return self._free.pop(i)[1]
            self.misses += 1
        return None

    def give(self, tensors: List[Optional[torch.Tensor]]) -> int:
        """Take the memory of the tensors in ``tensors`` (the list is emptied: the caller passes its
        references) that nothing else can reach (see the module doc); returns how many were kept."""
        kept = 0
        while tensors:
            t = tensors.pop()
            # 2: ``t`` here and getrefcount's argument; any other holder (a dict, a view's base) adds one
            if (_LONE is None or t is None or type(t) is not torch.Tensor or t.device.type != "cpu"
                    or sys.getrefcount(t) != 2 or _use_count(t) != _LONE or t.is_pinned() or hasattr(t, _MARK)):
                continue
            st = t.untyped_storage()
            nb = st.nbytes()
            if nb < MIN_BYTES or nb > self.cap:
                continue
            buf = torch.empty(0, dtype=torch.uint8).set_(st, 0, (nb,), (1,))
            del st, t
            with self._lock:
                self._free.append((nb, buf))
                self.nbytes += nb
                self._trim_locked(self.cap)
            kept += 1
        return kept

    def trim(self, keep: int) -> None:
        """Free the oldest buffers until at most ``keep`` bytes stay."""
        with self._lock:
            self._trim_locked(max(0, keep))

    def _trim_locked(self, keep: int) -> None:
        while self._free and self.nbytes > keep:
            nb, _ = self._free.pop(0)
            self.nbytes -= nb

    def clear(self) -> None:
        self.trim(0)


@contextlib.contextmanager
def active(pool: Optional[BufferPool]) -> Iterator[Optional[BufferPool]]:
    """Make ``pool`` the one :func:`take` draws from for the duration (process-wide: the engine's
    reader threads and its compute thread share it); the previous one is restored after."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, pool
    try:
        yield pool
    finally:
        _ACTIVE = prev
        if pool is not None:
            pool.clear()


def take(nbytes: int) -> Optional[torch.Tensor]:
    """A recycled ``uint8`` buffer of ``nbytes`` from the active pool, or None."""
    pool = _ACTIVE
    return pool.take(nbytes) if pool is not None else None
