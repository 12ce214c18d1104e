"""The temp directory that holds a server's ZeroMQ ipc:// sockets, and cleaning up after servers
that could not remove their own (SIGKILL, OOM kill, power loss).

Each directory is named `tidal-ipc-<pid>-<random>` and holds an `owner` file with the pid and the
process start time (from /proc), so that a recycled pid is not mistaken for a live owner. A
directory is stale, and removed at the next server start, when its owner process is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

log = logging.getLogger("tidal.server")

PREFIX = "tidal-ipc-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[A-Za-z0-9_]+$")


def create() -> str:
    """A fresh directory owned by this process."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    # Written under another name and renamed: another server's clean_stale must never read an
    # empty, just-opened owner file (it did, as "owner gone", and removed a starting replica's
    # directory from under it when several replicas started at once).
    tmp = os.path.join(path, "owner.tmp")
    with open(tmp, "w") as f:
        f.write(_owner_id(os.getpid()) or str(os.getpid()))
    os.replace(tmp, os.path.join(path, "owner"))
    return path


def clean_stale(root: str | None = None) -> list[str]:
    """Remove this user's ipc directories whose owner process is gone; returns their paths."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m is None:
            continue
        path = os.path.join(root, name)
        if _is_stale(path, int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info(
            "removed %d stale ipc director%s of servers that are gone: %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            ", ".join(removed),
        )
    return removed


def _is_stale(path: str, pid: int) -> bool:
    try:
        st = os.lstat(path)
        with open(os.path.join(path, "owner")) as f:
            recorded = f.read().strip()
    except OSError:  # not ours to judge: no owner file yet (being created), or unreadable
        return False
    if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
        return False
    current = _owner_id(pid)
    return current is None or current != recorded


def _owner_id(pid: int) -> str | None:
    """`pid:starttime` of a live process, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)  # no /proc: a live pid is taken as the owner
    if fields[0] == "Z":
        return None
    return f"{pid}:{fields[19]}"  # field 22 of stat: start time in clock ticks since boot


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
