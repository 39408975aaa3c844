"""Outputs that appear complete or not at all.

:class:`AtomicOutputDir` writes into ``.<OUT_DIR>.wweight-tmp-<token>`` beside ``OUT_DIR`` and
renames it into place at the end: an error, Ctrl-C or kill at any moment leaves nothing under
``OUT_DIR``. A non-empty ``OUT_DIR`` is refused unless ``overwrite=True``. Every writer of the
engine (merge, align, quantize, dequantize, :func:`save_checkpoint`) goes through
:func:`atomic_output`.

``--overwrite`` swaps the new directory with the old one in one ``renameat2(RENAME_EXCHANGE)``
(Linux), so ``OUT_DIR`` always holds either the old output or the complete new one. Elsewhere (or
on a filesystem without it) it is two renames, and a kill between them is repaired by the next run
(:func:`.stale.recover_backup`). What SIGKILL leaves behind is handled by :mod:`.stale`.
Every output file gets mode 0644 at commit, whichever library wrote it (safetensors' ``save_file``
creates 0600 files; the shards are 0644).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator, Optional, Sequence

from .format import CheckpointError, human
from .stale import OLD_SUFFIX, clean_stale, recover_backup, remove_owner, write_owner

FILE_MODE = 0o644
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``); False where the
    C library, kernel or filesystem lacks it (the caller falls back to two renames)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _set_modes(directory: str) -> None:
    """Every regular file under ``directory`` gets :data:`FILE_MODE` (symlinks are not followed)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fp = os.path.join(root, name)
            if not os.path.islink(fp):
                os.chmod(fp, FILE_MODE)

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
        recover_backup(self.out_dir)
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
        write_owner(self.tmp)
        clean_stale(self.out_dir, keep=self.tmp)
        return self.tmp

    def attach(self, token: str) -> str:
        """The temporary directory another process (rank 0) created with ``token``."""
        self.tmp = self._tmp_path(token)
        return self.tmp

    def commit(self) -> None:
        """Put the finished temporary directory at ``OUT_DIR`` (see the module doc)."""
        assert self.tmp is not None
        remove_owner(self.tmp)
        _set_modes(self.tmp)
        old = None
        if os.path.lexists(self.out_dir):
            if os.listdir(self.out_dir):
                if not self.overwrite:  # someone filled it while we computed
                    raise CheckpointError(f"OUT_DIR {self.out_dir} is not empty (pass --overwrite to replace it)")
                if _exchange(self.tmp, self.out_dir):
                    self.committed = True
                    fsync_dir(self.parent)
                    shutil.rmtree(self.tmp, ignore_errors=True)  # now the old output
                    return
                old = self._move_old_aside()
            else:
                os.rmdir(self.out_dir)
        self._move_new_in()
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def _move_old_aside(self) -> str:
        """Step 1 of the two-rename fallback: the old output becomes ``<tmp>-old``."""
        assert self.tmp is not None
        old = self.tmp + OLD_SUFFIX
        os.rename(self.out_dir, old)
        return old

    def _move_new_in(self) -> None:
        """Step 2: the new output becomes ``OUT_DIR``."""
        assert self.tmp is not None
        os.rename(self.tmp, self.out_dir)
        self.committed = True
        fsync_dir(self.parent)

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
