"""The record of originals on disk: appended per entry, reloaded, compacted; a torn last
line ignored, a corrupt file set aside, another boot's record discarded."""

from __future__ import annotations

import json
from pathlib import Path

from nodemem.host.originals import AdjOriginal, Originals, TmpfsKey, TmpfsOriginal


def _tmpfs(point: str = "/mnt/a", dev: int = 41) -> TmpfsOriginal:
    return TmpfsOriginal(TmpfsKey(4026531832, point, dev, 123), None, 64 << 20, 1000, "p")


def _adj(pid: int = 4242) -> AdjOriginal:
    return AdjOriginal(pid, 777, -5, "sleep", "p", "rule")


def test_entries_survive_a_reload_and_the_first_original_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "originals-agent.jsonl"
    record = Originals(path)
    record.add_tmpfs(_tmpfs())
    record.add_adj(_adj())
    # A later value is one a policy set, never the original.
    record.add_adj(AdjOriginal(4242, 777, 500, "sleep", "q", "other"))
    again = Originals(path)
    assert again.tmpfs == {_tmpfs().key: _tmpfs()}
    assert again.adj == {(4242, 777): _adj()}
    again.drop_adj((4242, 777))
    again.compact()
    assert Originals(path).adj == {}
    assert len(path.read_text().splitlines()) == 2  # header + the tmpfs entry


def test_a_mount_point_that_is_not_utf8_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "originals.jsonl"
    odd = _tmpfs(point=b"/mnt/\xff".decode(errors="surrogateescape"))
    Originals(path).add_tmpfs(odd)
    assert list(Originals(path).tmpfs.values()) == [odd]


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "originals.jsonl"
    Originals(path).add_adj(_adj())
    with open(path, "a") as file:
        file.write('{"adj": {"pid": 9')  # a crash mid-append
    assert list(Originals(path).adj) == [(4242, 777)]
    assert path.read_text().endswith("\n")  # compacted without it


def test_a_corrupt_record_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "originals.jsonl"
    Originals(path).add_adj(_adj())
    with open(path, "a") as file:
        file.write("not json\n")
        file.write(json.dumps({"adj": {"pid": 1, "start": 2, "value": 3}}) + "\n")
    record = Originals(path)
    assert not record
    assert not path.exists()
    assert len(list(tmp_path.glob("originals.jsonl.corrupt-*"))) == 1


def test_another_boots_record_is_discarded(tmp_path: Path) -> None:
    path = tmp_path / "originals.jsonl"
    Originals(path).add_tmpfs(_tmpfs())
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"format": 1, "bootId": "another-boot"})
    path.write_text("\n".join(lines) + "\n")
    assert not Originals(path)
    assert not Originals(path)  # and it was rewritten for this boot


def test_an_unwritable_record_stays_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    record = Originals(blocker / "originals.jsonl")  # its directory cannot be made
    record.add_adj(_adj())
    assert record.adj == {(4242, 777): _adj()}
