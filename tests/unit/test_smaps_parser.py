"""/proc/PID/smaps_rollup: exact bytes from well-formed text, SmapsError for anything else,
and a per-process error state (never a crash) when a process's file cannot be trusted."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcStatus
from nodemem.host.smaps import (
    REQUIRED_FIELDS,
    SmapsError,
    account_processes,
    parse_smaps_rollup,
    read_smaps_rollup,
)

HEADER = "55c41141d000-7ffc7d581000 ---p 00000000 00:00 0                          [rollup]\n"
REAL_FIELDS = Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
OPTIONAL = [line.split(":")[0] for line in REAL_FIELDS if line.split(":")[0] not in REQUIRED_FIELDS]


def rollup_text(values: dict[str, int], header: bool = True) -> str:
    body = "".join(f"{key + ':':<16}{kib:>8} kB\n" for key, kib in values.items())
    return (HEADER if header else "") + body


@st.composite
def rollups(draw: st.DrawFn) -> dict[str, int]:
    """Field values the kernel could give: Private_* and Pss within Rss."""
    private_clean = draw(st.integers(0, 2**30))
    private_dirty = draw(st.integers(0, 2**30))
    rss = private_clean + private_dirty + draw(st.integers(0, 2**30))
    pss = draw(st.integers(private_clean + private_dirty, rss))
    values = {
        "Rss": rss,
        "Pss": pss,
        "Private_Clean": private_clean,
        "Private_Dirty": private_dirty,
    }
    for name in draw(st.lists(st.sampled_from(OPTIONAL), unique=True)):
        values[name] = draw(st.integers(0, pss if name == "Pss_Shmem" else 2**40))
    return values


@given(rollups(), st.booleans())
def test_well_formed_rollups_give_exact_bytes(values: dict[str, int], header: bool) -> None:
    rollup = parse_smaps_rollup(rollup_text(values, header))
    assert rollup is not None
    assert (rollup.rss, rollup.pss) == (values["Rss"] * 1024, values["Pss"] * 1024)
    assert rollup.uss == (values["Private_Clean"] + values["Private_Dirty"]) * 1024
    shmem = values.get("Pss_Shmem")
    assert rollup.pss_shmem == (None if shmem is None else shmem * 1024)


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_random_text_parses_or_raises_smaps_error(text: str) -> None:
    try:
        rollup = parse_smaps_rollup(text)
    except SmapsError as exc:  # anything else escaping fails the test
        assert str(exc).startswith("smaps_rollup")
        return
    if rollup is None:
        assert not text.strip()
        return
    # Never a number the text does not say.
    numbers = {int(n) * 1024 for n in re.findall(r"[0-9]+", text)}
    assert {rollup.rss, rollup.pss} <= numbers


@settings(max_examples=300)
@given(rollups(), st.integers(0, 2000), st.text(max_size=30))
def test_real_rollups_with_garbage_spliced_in_never_crash(
    values: dict[str, int], at: int, garbage: str
) -> None:
    text = rollup_text(values)
    cut = at % (len(text) + 1)
    with contextlib.suppress(SmapsError):  # anything else escaping fails the test
        parse_smaps_rollup(text[:cut] + garbage + text[cut:])


BASE = {"Rss": 100, "Pss": 50, "Private_Clean": 10, "Private_Dirty": 20}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (rollup_text(BASE) + "Pss_Shmem: 12x kB\n", "line 6: Pss_Shmem is not a number"),
        (rollup_text(BASE) + "Pss_Shmem: ² kB\n", "is not a number"),
        (rollup_text(BASE) + "Pss_Shmem: 12 MB\n", "unit 'MB'"),
        (rollup_text(BASE) + "Pss_Shmem: 12\n", "malformed"),
        (rollup_text(BASE) + "Pss Shmem: 12 kB\n", "malformed"),
        (rollup_text(BASE) + "Rss: 5 kB\n", "Rss appears twice"),
        (rollup_text(BASE) + f"Swap: {'9' * 5000} kB\n", "Swap is over 2^60 bytes"),
        (rollup_text(BASE) + f"Swap: {2**50} kB\n", "over 2^60"),
        (rollup_text({"Rss": 1, "Pss": 1, "Private_Clean": 1}), "lacks Private_Dirty"),
        (rollup_text({**BASE, "Pss": 101}), "Pss (103424 bytes) exceeds Rss"),
        (rollup_text({**BASE, "Private_Dirty": 91}), "Private_Dirty (103424 bytes) exceeds"),
        (rollup_text({**BASE, "Pss_Shmem": 51}), "Pss_Shmem (52224 bytes) exceeds Pss"),
        (HEADER, "header but no fields"),
        ("Rss: 1 kB\n" + HEADER, "malformed"),  # a header is only the first line
    ],
)
def test_corruptions_are_named(text: str, message: str) -> None:
    with pytest.raises(SmapsError, match=re.escape(message)):
        parse_smaps_rollup(text)


def test_an_empty_file_is_no_memory() -> None:
    assert parse_smaps_rollup("") is None


def test_every_readable_process_on_this_host_parses() -> None:
    # The consistency checks (Pss, USS within Rss) hold for what the kernel really writes.
    paths = HostPaths()
    parsed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            rollup = read_smaps_rollup(paths, int(name))
        except Exception as exc:  # gone, kernel thread, refused: not what this tests
            assert not isinstance(exc, SmapsError), exc
            continue
        parsed += rollup is not None
    assert parsed >= 1


def status(pid: int, comm: str, kthread: bool = False) -> ProcStatus:
    return ProcStatus(
        pid=pid,
        comm=comm,
        ppid=1,
        uid=0,
        kthread=kthread,
        rss_bytes=0,
        rss_shmem_bytes=4096,
        swap_bytes=0,
        pte_bytes=0,
    )


def test_a_hostile_file_is_an_error_state_of_that_process_only(tmp_path: Path) -> None:
    files = {
        10: rollup_text({**BASE, "Pss_Shmem": 5}),
        11: "Rss: \x1b[2J kB\n",  # a terminal escape where a number should be
        12: rollup_text({**BASE, "Pss": 80}),
        13: "",  # no mm
    }
    for pid, text in files.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "smaps_rollup").write_text(text)
    statuses = {pid: status(pid, f"p{pid}") for pid in files}
    statuses[14] = status(14, "gone")  # no directory: exited meanwhile
    statuses[15] = status(15, "kthreadd", kthread=True)  # never read
    accounting = account_processes(HostPaths(proc_root=tmp_path), statuses)
    assert [(p.pid, p.pss, p.uss, p.pss_shmem, p.rss_shmem) for p in accounting.processes] == [
        (12, 80 * 1024, 30 * 1024, None, 4096),
        (10, 50 * 1024, 30 * 1024, 5 * 1024, 4096),
    ]
    ((pid, comm, reason),) = [(f.pid, f.comm, f.reason) for f in accounting.failures]
    assert (pid, comm) == (11, "p11")
    assert reason.startswith("smaps_rollup line 1: Rss is not a number: '\\x1b[2J'")
