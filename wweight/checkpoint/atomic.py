"""Outputs that appear complete or not at all.

:class:`AtomicOutputDir` writes into ``.<OUT_DIR>.wweight-tmp-<token>`` beside ``OUT_DIR`` and
renames it into place at the end: an error, Ctrl-C or kill at any moment leaves nothing under
``OUT_DIR``. A non-empty ``OUT_DIR`` is refused unless ``overwrite=True``. Every writer of the
engine (merge, align, quantize, dequantize, :func:`save_checkpoint`) goes through
:func:`atomic_output`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator, Optional, Sequence

from .format import CheckpointError, human

class AtomicOutputDir:
    """Output directory that appears complete or not at all.

    Files go to ``<parent>/.<name>.wweight-tmp-<token>``; :meth:`commit` renames it to ``OUT_DIR``
    (replacing an existing one only when ``overwrite``); :meth:`abort` deletes it. ``inputs`` are
    directories that must not overlap ``OUT_DIR`` (so ``--overwrite`` never deletes a model).
    """

    def __init__(self, out_dir: str, *, overwrite: bool = False, inputs: Sequence[str] = ()):
        self.out_dir = os.path.abspath(out_dir)
        self.overwrite = overwrite
        real = os.path.realpath(self.out_dir)
        for p in inputs:
            rp = os.path.realpath(p)
            if os.path.commonpath([real, rp]) in (real, rp):
                raise CheckpointError(f"OUT_DIR {out_dir} overlaps the input model {p}")
        if os.path.lexists(self.out_dir):
            if not os.path.isdir(self.out_dir):
                raise CheckpointError(f"OUT_DIR {out_dir} exists and is not a directory")
            if os.listdir(self.out_dir) and not overwrite:
                raise CheckpointError(f"OUT_DIR {out_dir} is not empty (pass --overwrite to replace it)")
        self.parent = os.path.dirname(self.out_dir)
        self.tmp: Optional[str] = None
        self.committed = False

    def check_space(self, nbytes: int) -> None:
        probe = self.parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free
        need = nbytes + (16 << 20)
        if free < need:
            raise CheckpointError(f"not enough disk space for OUT_DIR {self.out_dir}: need {human(need)}, "
                                  f"{human(free)} free on {probe}")

    def _tmp_path(self, token: str) -> str:
        return os.path.join(self.parent, f".{os.path.basename(self.out_dir)}.wweight-tmp-{token}")

    def create(self, token: Optional[str] = None) -> str:
        """Make the temporary directory (``token``: its suffix, shared by all ranks of a run)."""
        os.makedirs(self.parent, exist_ok=True)
        self.tmp = self._tmp_path(token or uuid.uuid4().hex[:12])
        os.mkdir(self.tmp)
        return self.tmp

    def attach(self, token: str) -> str:
        """The temporary directory another process (rank 0) created with ``token``."""
        self.tmp = self._tmp_path(token)
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None
        old = None
        if os.path.lexists(self.out_dir):
            if os.listdir(self.out_dir):
                if not self.overwrite:  # someone filled it while we computed
                    raise CheckpointError(f"OUT_DIR {self.out_dir} is not empty (pass --overwrite to replace it)")
                old = self.tmp + "-old"
                os.rename(self.out_dir, old)
            else:
                os.rmdir(self.out_dir)
        os.rename(self.tmp, self.out_dir)
        self.committed = True
        fsync_dir(self.parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.tmp and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _cleanup_on_signal():
    """SIGTERM / SIGHUP become SystemExit so ``finally`` blocks remove the temporary directory."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = {}

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            with contextlib.suppress(Exception):
                prev[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in prev.items():
            with contextlib.suppress(Exception):
                signal.signal(s, h)


def os_error(e: OSError) -> CheckpointError:
    """An OSError while writing, as the one-line error the command line prints."""
    if e.errno == errno.ENOSPC:
        return CheckpointError(f"no space left on device while writing {e.filename or 'the output'}")
    return CheckpointError(f"{e.filename or 'I/O error'}: {e.strerror or e}")




@contextlib.contextmanager
def atomic_output(out: AtomicOutputDir, token: Optional[str] = None, *, owner: bool = True) -> Iterator[str]:
    """Write ``out`` atomically: yields the temporary directory to fill; the body calls
    ``out.commit()`` when everything is written.

    ``owner`` creates the directory and removes it again unless committed, whatever happens
    (an error, Ctrl-C, SIGTERM / SIGHUP, which become ``SystemExit`` here); a process that is not
    the owner (ranks other than 0) only attaches to the directory named by ``token``. An
    ``OSError`` becomes a one-line :class:`CheckpointError` (a full disk names the file).
    """
    with _cleanup_on_signal():
        try:
            yield out.create(token) if owner else out.attach(token)
        except OSError as e:
            raise os_error(e) from None
        finally:
            if owner:
                out.abort()
