"""A process with memory a test knows, held until stdin closes.

`python memory_holder.py private SIZE`: SIZE bytes of private anonymous memory, every
page written. `memfd SIZE`: a memfd of SIZE bytes, mapped shared and written (prints
its fd). `map PATH SIZE`: maps PATH (another holder's `/proc/PID/fd/N`) shared and
reads every page, so both map the same Shmem pages. Prints one JSON line once ready.
With HOLDER_COMM set, the process names itself so (a comm any process may choose).
"""

from __future__ import annotations

import json
import mmap
import os
import sys

CHUNK = b"\xa5" * (1 << 20)


def write_all(area: mmap.mmap, size: int) -> None:
    for offset in range(0, size, len(CHUNK)):  # in chunks: no SIZE-byte temporary
        area[offset : offset + len(CHUNK)] = CHUNK


def main() -> None:
    kind = sys.argv[1]
    if "HOLDER_COMM" in os.environ:
        with open("/proc/self/comm", "wb") as comm:
            comm.write(os.environ["HOLDER_COMM"].encode())
    info: dict[str, object] = {"pid": os.getpid()}
    keep: list[object] = []
    if kind == "private":
        size = int(sys.argv[2])
        if size:
            area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            write_all(area, size)
            keep.append(area)
    elif kind == "memfd":
        size = int(sys.argv[2])
        fd = os.memfd_create("nodemem-pss-test")
        os.ftruncate(fd, size)
        area = mmap.mmap(fd, size)  # MAP_SHARED
        write_all(area, size)
        keep += [fd, area]
        info["fd"] = fd
    elif kind == "map":
        path, size = sys.argv[2], int(sys.argv[3])
        fd = os.open(path, os.O_RDWR)
        area = mmap.mmap(fd, size)
        os.close(fd)
        checksum = sum(area[offset] for offset in range(0, size, mmap.PAGESIZE))  # fault in
        info["checksum"] = checksum
        keep.append(area)
    else:
        raise SystemExit(f"unknown kind {kind}")
    print(json.dumps(info), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
