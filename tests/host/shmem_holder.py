"""A process that creates one kind of Shmem object and holds it until stdin closes.

Run by the attribution tests: `python shmem_holder.py KIND SIZE [PATH]`. Prints one
JSON line ({"pid": ..., plus what identifies the object}) once the object exists.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
libc.shmdt.argtypes = (ctypes.c_void_p,)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long)
IPC_PRIVATE, IPC_CREAT = 0, 0o1000
CHUNK = b"\xa5" * (1 << 20)


def map_shared(fd: int, size: int) -> int:
    """mmap(MAP_SHARED) of `fd` that holds no fd (unmapped when the process exits)."""
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return int(address)


def fill(fd: int, size: int) -> None:
    for _ in range(size >> 20):
        os.write(fd, CHUNK)


def sysv(size: int, attached: bool) -> dict[str, object]:
    shmid = libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    addr = libc.shmat(shmid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "shmat")
    ctypes.memset(addr, 0xA5, size)
    if not attached:
        libc.shmdt(ctypes.c_void_p(addr))
    return {"shmid": shmid}


def main() -> None:
    kind, size = sys.argv[1], int(sys.argv[2])
    path = sys.argv[3] if len(sys.argv) > 3 else ""
    info: dict[str, object] = {"pid": os.getpid()}
    keep: list[object] = []
    if kind in ("sysv", "sysv-orphan"):
        info |= sysv(size, attached=kind == "sysv")
    elif kind == "memfd":
        fd = os.memfd_create(path or "nodemem-test")
        fill(fd, size)
        keep.append(fd)
    elif kind == "memfd-mapped-only":
        fd = os.memfd_create(path or "nodemem-test")
        os.ftruncate(fd, size)
        # libc mmap, not mmap.mmap: CPython's mmap object keeps a dup of the fd, and
        # then the fd scan, not the maps scan, would find the memfd.
        address = map_shared(fd, size)
        ctypes.memset(address, 0xA5, size)
        os.close(fd)
    elif kind == "shared-anon":
        area = mmap.mmap(-1, size)  # MAP_SHARED|MAP_ANONYMOUS: shmem
        area.write(CHUNK * (size >> 20))
        keep.append(area)
    elif kind == "deleted-open":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fill(fd, size)
        os.unlink(path)
        keep.append(fd)
    elif kind == "open-file":  # hold a file open (e.g. to pin a mount that is then detached)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fill(fd, size)
        keep.append(fd)
    elif kind == "tmpfs-in-namespace":  # run under `unshare -m --propagation private`
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", path], check=True)
        fd = os.open(os.path.join(path, "data"), os.O_RDWR | os.O_CREAT, 0o600)
        fill(fd, size)
        os.close(fd)
    elif kind == "posix-shm-in-namespace":  # a private /dev/shm: never the host's
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", "/dev/shm"], check=True)
        fd = os.open("/dev/shm/nodemem-test", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        area = mmap.mmap(fd, size)
        area.write(CHUNK * (size >> 20))
        os.close(fd)
        keep.append(area)
    else:
        raise SystemExit(f"unknown kind {kind}")
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # hold until the test closes our stdin


if __name__ == "__main__":
    main()
