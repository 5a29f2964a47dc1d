"""The values a policy changed, as they were before its first change: kept on the host so
that they can be put back when the policy stops applying (`nodemem restore`, the agent).

A tmpfs is named by its mount namespace, its mount point and its superblock: st_dev and
the birth time of the mount's root directory (the kernel gives a freed st_dev to the next
tmpfs at once, so st_dev alone cannot tell a tmpfs mounted later at the same path). A
process is named by pid and start time (pids are reused).

The record is a journal, one JSON document a line: each new original is one appended
line (no rewrite of the whole record per process an oom rule adjusts), and `compact`
rewrites it atomically once entries are dropped. Its first line names the boot: after a
reboot no process and no tmpfs of the record exists any more, so an older boot's record
is discarded. A torn last line (a crash mid-append) is ignored; any other unreadable line
sets the file aside (renamed, never fatal).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import list_pids
from nodemem.host.statx import BirthTime
from nodemem.host.tmpfs_limits import host_namespace_pid

log = logging.getLogger("nodemem.originals")

AGENT_FILE = "originals-agent.jsonl"  # the agent's own: it restores what its policies changed
APPLY_FILE = "originals-apply.jsonl"  # `nodemem apply`'s: put back by `nodemem restore`
_FORMAT = 1
_MAX_BYTES = 64 << 20  # a record this large is not ours: set aside, never read whole


@dataclass(frozen=True)
class TmpfsKey:
    namespace: int  # inode of the mount namespace (ns/mnt)
    mount_point: str  # as that namespace sees it
    dev: int  # the superblock's st_dev
    birth: int | None  # birth time (ns) of the mount's root directory; None: not reported


@dataclass(frozen=True)
class TmpfsOriginal:
    key: TmpfsKey
    namespace_pid: int | None  # a process in that namespace when recorded; None: the host's
    size_bytes: int
    nr_inodes: int
    policy: str  # the policy whose change this undoes (for reports)
    pattern: str = ""  # the item that changed it, and its pod (podShm), for reports
    pod: str | None = None


@dataclass(frozen=True)
class AdjOriginal:
    pid: int
    start: int  # procfs.start_time
    value: int
    comm: str
    policy: str
    rule: str

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


class Originals:
    """The record; `path` None keeps it in memory only (it then ends with the process)."""

    def __init__(self, path: str | Path | None, paths: HostPaths | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.paths = paths or HostPaths()
        self.boot_id = _boot_id(self.paths)
        self.tmpfs: dict[TmpfsKey, TmpfsOriginal] = {}
        self.adj: dict[tuple[int, int], AdjOriginal] = {}
        self._fd: int | None = None
        if self.path is not None:
            self._load(self.path)

    def __bool__(self) -> bool:
        return bool(self.tmpfs or self.adj)

    def add_tmpfs(self, original: TmpfsOriginal) -> None:
        """Keep the first original only: a later one is a value a policy set."""
        if original.key not in self.tmpfs:
            self.tmpfs[original.key] = original
            self._append({"tmpfs": _tmpfs_to_json(original)})

    def add_adj(self, original: AdjOriginal) -> None:
        if original.key not in self.adj:
            self.adj[original.key] = original
            self._append({"adj": asdict(original)})

    def drop_tmpfs(self, key: TmpfsKey) -> None:
        """Forget (call `compact` after a batch to make it last)."""
        self.tmpfs.pop(key, None)

    def drop_adj(self, key: tuple[int, int]) -> None:
        self.adj.pop(key, None)

    def compact(self) -> None:
        """Rewrite the record as it is now, atomically (no-op in memory)."""
        if self.path is None:
            return
        self._close()  # the appends go to the new file
        try:
            self._rewrite(self.path)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        # Never fatal: the record stays in memory, and undo works until a restart.
        log.error(
            "cannot write the record of originals %s: %s (kept in memory only)",
            self.path,
            exc.strerror or exc,
        )

    def _rewrite(self, path: Path) -> None:
        lines = [self._header()]
        lines += [json.dumps({"tmpfs": _tmpfs_to_json(o)}) for o in self.tmpfs.values()]
        lines += [json.dumps({"adj": asdict(o)}) for o in self.adj.values()]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(fd, "w") as file:
                file.write("".join(line + "\n" for line in lines))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- the file -------------------------------------------------------------------------

    def _header(self) -> str:
        return json.dumps({"format": _FORMAT, "bootId": self.boot_id})

    def _append(self, entry: dict[str, Any]) -> None:
        # No fsync: the record only matters within this boot, and a crash of the process
        # leaves written data in the page cache; O_APPEND makes each line one write.
        if self.path is None:
            return
        try:
            if self._fd is None:  # kept open: an oom rule's first write per process waits on it
                self.path.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                self._fd = os.open(self.path, flags, 0o600)
                if os.fstat(self._fd).st_size == 0:
                    os.write(self._fd, (self._header() + "\n").encode())
            os.write(self._fd, (json.dumps(entry) + "\n").encode())
        except OSError as exc:
            self._close()
            self._write_failed(exc)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self._close()

    def _load(self, path: Path) -> None:
        try:
            with open(path, "rb") as file:
                data = file.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the record of originals %s: %s", path, exc.strerror or exc)
            return
        if len(data) > _MAX_BYTES:
            self._set_aside(path, f"larger than {_MAX_BYTES} bytes")
            return
        lines = data.split(b"\n")
        torn = lines.pop()  # after the last newline: empty, or a line cut short by a crash
        if torn:
            log.warning("%s: ignoring a torn last line (%d bytes)", path, len(torn))
        try:
            header = json.loads(lines[0]) if lines else None
            if not isinstance(header, dict) or header.get("format") != _FORMAT:
                raise ValueError("no header line")
            if header.get("bootId") != self.boot_id:
                log.info("%s is from another boot: nothing of it exists now, discarded", path)
                self.compact()
                return
            for number, line in enumerate(lines[1:], start=2):
                self._load_entry(number, json.loads(line))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            self.tmpfs.clear()
            self.adj.clear()
            self._set_aside(path, str(exc))
            return
        if torn:
            self.compact()

    def _load_entry(self, number: int, entry: Any) -> None:
        if isinstance(entry, dict) and isinstance(entry.get("tmpfs"), dict):
            original = _tmpfs_from_json(entry["tmpfs"])
            self.tmpfs.setdefault(original.key, original)
        elif isinstance(entry, dict) and isinstance(entry.get("adj"), dict):
            adj = AdjOriginal(**entry["adj"])
            if not all(isinstance(v, int) for v in (adj.pid, adj.start, adj.value)):
                raise ValueError(f"line {number}: pid, start and value must be numbers")
            self.adj.setdefault(adj.key, adj)
        else:
            raise ValueError(f"line {number}: neither a tmpfs nor an adj entry")

    def _set_aside(self, path: Path, reason: str) -> None:
        """A corrupt record is renamed, never fatal: its bytes stay for whoever looks."""
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            log.error("record %s is unusable (%s); setting it aside failed: %s", path, reason, exc)
            return
        log.error("record %s is unusable, set aside as %s: %s", path, aside.name, reason)


def _tmpfs_to_json(original: TmpfsOriginal) -> dict[str, Any]:
    # A mount point that is not UTF-8 keeps its surrogate escapes: json writes them as
    # \udcXX, which load back to the same str.
    return asdict(original)


def _tmpfs_from_json(data: dict[str, Any]) -> TmpfsOriginal:
    key = TmpfsKey(**data.pop("key"))
    original = TmpfsOriginal(key=key, **data)
    numbers = (key.namespace, key.dev, original.size_bytes, original.nr_inodes)
    if not isinstance(key.mount_point, str) or not all(isinstance(n, int) for n in numbers):
        raise ValueError(f"malformed tmpfs entry for {key.mount_point!r}")
    return original


def _boot_id(paths: HostPaths) -> str:
    try:
        return paths.proc("sys", "kernel", "random", "boot_id").read_text().strip()
    except OSError:
        return ""


# -- identities -----------------------------------------------------------------------------


def mount_namespace(paths: HostPaths, namespace_pid: int | None) -> int | None:
    """The inode of the mount namespace a Target names (`namespace_pid` None: the host
    root's), or None when its process is gone."""
    try:
        pid = namespace_pid if namespace_pid is not None else host_namespace_pid(paths)
        return os.stat(paths.proc("self" if pid is None else pid, "ns", "mnt")).st_ino
    except (OSError, ValueError):
        return None


def pids_in_namespace(paths: HostPaths, namespace: int) -> Iterator[int]:
    """Processes in the mount namespace with this inode (to reach one whose recorded
    process is gone)."""
    for pid in list_pids(paths):
        try:
            if os.stat(paths.proc(pid, "ns", "mnt")).st_ino == namespace:
                yield pid
        except OSError:
            continue


_AT_FDCWD = -100


def birth_time(path: str | Path) -> int | None:
    """The birth time (ns) of `path`'s inode; None when the kernel or libc does not say."""
    try:
        return BirthTime().ns(_AT_FDCWD, str(path))[1]
    except OSError:
        return None
