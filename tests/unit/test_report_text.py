"""Every string a report carries is valid text, whatever bytes the host named things with."""

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st

from nodemem.api.report import CleanupStatus, HeldOpenFile, ProcessRef, TmpfsStatus


@given(st.binary(max_size=64))
def test_an_os_name_of_any_bytes_serializes_with_replacement_characters(raw: bytes) -> None:
    name = os.fsdecode(raw)  # as os.readlink / os.listdir give it: surrogate escapes
    status = TmpfsStatus(path=name, pattern="/x/*", policy="p", state="Applied")
    document = json.loads(status.model_dump_json())
    assert document["path"] == raw.decode(errors="replace")


@given(st.text())
def test_valid_text_is_unchanged_and_any_str_serializes(text: str) -> None:
    # st.text() also yields lone surrogates, as JSON "\ud800" would.
    held = HeldOpenFile(path=text, bytes=1, pids=[ProcessRef(pid=1, comm=text)])
    held.model_dump_json()
    if not any(0xD800 <= ord(char) <= 0xDFFF for char in text):
        assert held.path == text
        assert held.pids[0].comm == text


def test_lists_of_names_and_nested_reports_are_made_printable_too() -> None:
    status = CleanupStatus(
        name="logs",
        policy="p",
        would_remove=["/x/a\udcff"],
        held_open=[{"path": "/x/b\udcfe", "bytes": 1, "pids": [{"pid": 2, "comm": "c\udcfd"}]}],
    )
    assert status.would_remove == ["/x/a\ufffd"]
    assert status.held_open[0].path == "/x/b\ufffd"
    assert status.held_open[0].pids[0].comm == "c\ufffd"
