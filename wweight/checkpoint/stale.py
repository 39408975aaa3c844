"""What a killed run leaves beside ``OUT_DIR``, and how the next run deals with it.

SIGKILL (or a power cut) runs no ``finally``: :class:`~.atomic.AtomicOutputDir`'s temporary
``.<OUT_DIR>.wweight-tmp-<token>`` stays, and an ``--overwrite`` without ``renameat2`` killed
between its two renames leaves the old output as ``...-<token>-old`` and no ``OUT_DIR``. So each
temporary directory holds :data:`OWNER_FILE` (pid, host, process start time) and the next run for
the same ``OUT_DIR``:

* removes a temporary directory whose owner ran on this host and is dead (one line on stderr);
* never touches one whose owner is alive, ran on another host (a shared filesystem: we cannot tell
  whether it is alive) or is unknown; for those it prints the command that removes it;
* restores a ``-old`` backup when ``OUT_DIR`` is missing (the user's previous output is never lost).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
from typing import List, Optional

OWNER_FILE = ".wweight-owner.json"
OLD_SUFFIX = "-old"


def _say(msg: str) -> None:
    print(f"wweight: {msg}", file=sys.stderr)


def _start_time(pid: int) -> Optional[str]:
    """The process start time (Linux ``/proc``), so a reused pid is not taken for the owner."""
    try:
        with open(f"/proc/{pid}/stat", "r", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_owner(tmp: str) -> None:
    """Record who is writing ``tmp`` (removed again just before the commit renames it)."""
    pid = os.getpid()
    info = {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}
    with open(os.path.join(tmp, OWNER_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f)


def remove_owner(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tmp, OWNER_FILE))


def _read_owner(tmp: str) -> Optional[dict]:
    try:
        with open(os.path.join(tmp, OWNER_FILE), "r", encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def pid_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether ``pid`` runs on this host (and, when ``start`` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: treat as alive (never remove a live run's work)
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False
    return True


def temp_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.wweight-tmp-"


def _siblings(out_dir: str) -> List[str]:
    parent, pre = os.path.dirname(out_dir), temp_prefix(out_dir)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    return [os.path.join(parent, n) for n in names if n.startswith(pre) and os.path.isdir(os.path.join(parent, n))]


def recover_backup(out_dir: str) -> Optional[str]:
    """``OUT_DIR`` missing and a ``-old`` backup beside it: an ``--overwrite`` was killed between
    its two renames. Rename the backup back (the old output returns) and say so."""
    if os.path.lexists(out_dir):
        return None
    for p in _siblings(out_dir):
        if p.endswith(OLD_SUFFIX):
            os.rename(p, out_dir)
            _say(f"restored the previous {out_dir} from {os.path.basename(p)} "
                 "(an earlier --overwrite was interrupted)")
            return p
    return None


def clean_stale(out_dir: str, *, keep: Optional[str] = None) -> List[str]:
    """Remove the temporary directories of dead runs on this host for ``out_dir``; report the
    others. Returns the removed paths. ``keep``: this run's own directory."""
    host = socket.gethostname()
    removed = []
    for p in _siblings(out_dir):
        if p == keep:
            continue
        if p.endswith(OLD_SUFFIX):
            owner = None  # a previous output, kept after an interrupted --overwrite: the user decides
        else:
            owner = _read_owner(p)
        if owner is not None and owner.get("host") == host:
            if pid_alive(owner["pid"], owner.get("start")):
                continue  # a live run writing the same OUT_DIR: not ours to touch
            shutil.rmtree(p, ignore_errors=True)
            if not os.path.exists(p):
                removed.append(p)
                _say(f"removed {p}, left by a killed run (pid {owner['pid']})")
                continue
        who = (f"by pid {owner['pid']} on host {owner.get('host')}" if owner is not None
               else "by an unknown run")
        _say(f"{p} was left {who}; if no run is writing {os.path.basename(out_dir)}, "
             f"remove it with: rm -rf {shlex.quote(p)}")
    return removed
