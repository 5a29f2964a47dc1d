"""/proc parsers: well-formed text gives exact numbers, anything else a clear error.

Property tests: a parser either returns exactly what the text says or raises its own
error type naming the problem; it never guesses a number.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemem.host.meminfo import REQUIRED_FIELDS, MeminfoError, parse_meminfo
from nodemem.host.mounts import MountinfoError, parse_mountinfo, unescape
from nodemem.host.procfs import parse_status
from nodemem.host.procmaps import MapsParseError, parse_maps
from nodemem.host.sysvipc import SysvParseError, parse_sysvipc_shm

SYSV_HEADER = (
    "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid"
    "      atime      dtime      ctime                   rss                  swap"
)

kib_values = st.integers(min_value=0, max_value=2**40)
field_names = st.sampled_from([*REQUIRED_FIELDS, "Buffers", "Cached", "Mlocked", "Hugetlb"])


def meminfo_text(values: dict[str, int]) -> str:
    return "".join(f"{key + ':':<16}{value:>8} kB\n" for key, value in values.items())


@given(st.dictionaries(field_names, kib_values))
def test_meminfo_gives_exact_bytes_or_names_what_is_missing(values: dict[str, int]) -> None:
    text = meminfo_text(values)
    if set(REQUIRED_FIELDS) <= set(values):
        assert parse_meminfo(text) == {key: kib * 1024 for key, kib in values.items()}
    else:
        with pytest.raises(MeminfoError, match="lacks"):
            parse_meminfo(text)


@given(st.binary(max_size=200).map(lambda raw: raw.decode(errors="replace")), st.text())
def test_any_meminfo_bytes_parse_or_raise_meminfo_error(garbage: str, text: str) -> None:
    real = Path("/proc/meminfo").read_text()
    for candidate in (garbage, text, real[: len(garbage)], real + text, "MemTotal: \u00b2 kB"):
        with contextlib.suppress(MeminfoError):  # anything else escaping fails the test
            parse_meminfo(candidate)


def test_meminfo_reads_the_real_file() -> None:
    with open("/proc/meminfo") as file:
        values = parse_meminfo(file.read())
    assert values["MemTotal"] > values["MemAvailable"] > 0


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("Shmem:       12x kB", "not a number"),
        ("Shmem:       12 MB", "unit"),
        ("Shmem        12 kB", "malformed"),
        ("Shmem:", "malformed"),
        ("Shmem:       1 2 kB", "malformed"),
        ("MemTotal:    5 kB", "twice"),
    ],
)
def test_meminfo_corruptions_are_rejected(corruption: str, message: str) -> None:
    base = {key: 1000 for key in REQUIRED_FIELDS if key != "Shmem"}
    with pytest.raises(MeminfoError, match=message):
        parse_meminfo(meminfo_text(base) + corruption + "\n")


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_meminfo_random_text_never_yields_a_number_not_in_the_text(text: str) -> None:
    try:
        values = parse_meminfo(text)
    except MeminfoError:
        return
    for key, value in values.items():
        assert f"{key}:" in text
        shown = value // 1024 if value % 1024 == 0 else value
        assert str(shown) in text or str(value) in text


MOUNTINFO = (
    "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334524k,mode=755\n"
    "25 24 0:23 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=24684096k\n"
    "40 27 0:41 /sub /var/lib/kubelet/pods/x/volumes/kubernetes.io~empty-dir/my\\040vol "
    "rw,relatime shared:5 master:1 - tmpfs tmpfs rw,size=65536k\n"
)


def test_mountinfo_fields_and_escapes() -> None:
    dev, shm, pod = parse_mountinfo(MOUNTINFO)
    assert (dev.fstype, dev.dev, dev.is_shmem) == ("devtmpfs", os.makedev(0, 6), True)
    assert shm.mount_options == "rw,nosuid,nodev"
    assert shm.super_option("size") == "24684096k"
    assert pod.mount_point.endswith("empty-dir/my vol")  # optional fields skipped, \040 undone
    assert pod.root == "/sub"
    assert pod.parent_id == 27


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from("0123456789 :/-abtmpfs\\\n"), max_size=200))
def test_mountinfo_random_text_parses_or_raises_mountinfo_error(text: str) -> None:
    try:
        mounts = parse_mountinfo(text)
    except MountinfoError as exc:
        assert "mountinfo line" in str(exc)
        return
    for mount in mounts:
        assert mount.mount_point.startswith("/")


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_unescape_inverts_the_kernels_octal_escaping(path: str) -> None:
    escaped = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)
    assert unescape(escaped) == path


sysv_rows = st.lists(
    st.tuples(*[st.integers(min_value=0, max_value=2**31) for _ in range(16)]), max_size=5
)


@given(sysv_rows)
def test_sysvipc_rows_round_trip(rows: list[tuple[int, ...]]) -> None:
    text = SYSV_HEADER + "\n" + "".join(" ".join(map(str, row)) + "\n" for row in rows)
    segments = parse_sysvipc_shm(text)
    assert [(s.shmid, s.nattch, s.rss_bytes, s.swap_bytes) for s in segments] == [
        (row[1], row[6], row[14], row[15]) for row in rows
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "key shmid perms size\n",
        SYSV_HEADER + "\n1 2 3\n",
        SYSV_HEADER + "\n" + " ".join(["1"] * 15) + " x\n",
        SYSV_HEADER + "\n" + " ".join(["1"] * 14) + " -5 0\n",
    ],
)
def test_sysvipc_malformed_is_rejected(text: str) -> None:
    with pytest.raises(SysvParseError):
        parse_sysvipc_shm(text)


def test_maps_lines_with_spaces_and_deleted_suffix() -> None:
    text = (
        "7f0000000000-7f0002000000 rw-s 00000000 00:01 2051 /memfd:my buf (deleted)\n"
        "7f0002000000-7f0002001000 r--p 00000000 fd:00 131 /usr/lib/libc.so.6\n"
        "7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]\n"
        "7ffe0000-7ffe1000 rw-p 00000000 00:00 0\n"
    )
    memfd, libc, stack, anon = parse_maps(text)
    assert memfd.path == "/memfd:my buf (deleted)"
    assert (memfd.dev, memfd.inode, memfd.range_name) == (
        os.makedev(0, 1),
        2051,
        "7f0000000000-7f0002000000",
    )
    assert libc.dev == os.makedev(0xFD, 0)
    assert (stack.path, anon.path) == ("[stack]", "")


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from("0123456789abcdef-: rwxsp/\n"), max_size=200))
def test_maps_random_text_parses_or_raises(text: str) -> None:
    try:
        for mapping in parse_maps(text):
            assert mapping.end >= mapping.start
    except MapsParseError as exc:
        assert "maps line" in str(exc)


def test_status_of_a_kernel_thread_and_a_process() -> None:
    kthread = parse_status(2, "Name:\tkthreadd\nPPid:\t0\nUid:\t0\t0\t0\t0\nKthread:\t1\n")
    assert kthread.kthread
    proc = parse_status(
        7,
        "Name:\tpostgres\nPPid:\t1\nUid:\t70\t70\t70\t70\nVmSize:\t 100 kB\n"
        "VmRSS:\t  2048 kB\nRssShmem:\t 1024 kB\nVmSwap:\t 0 kB\nVmPTE:\t 8 kB\n",
    )
    assert (proc.comm, proc.uid, proc.kthread) == ("postgres", 70, False)
    assert (proc.rss_bytes, proc.rss_shmem_bytes, proc.pte_bytes) == (2 << 20, 1 << 20, 8192)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Name:\tx\n",
        "Name:\tx\nPPid:\tone\nUid:\t0\n",
        "Name:\tx\nPPid:\t1\nUid:\t0\nVmRSS:\t1 MB\n",
    ],
)
def test_status_malformed_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="pid 9"):
        parse_status(9, text)
