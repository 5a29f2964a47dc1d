"""Every string a report carries is valid text, whatever bytes the host named things with."""

from __future__ import annotations

import json
import os
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from nodemem.api.report import (
    ApplyReport,
    CleanupStatus,
    HeldOpenFile,
    ProcessRef,
    TmpfsStatus,
)
from nodemem.tables import apply_report_text, visible


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


HIDDEN = st.characters(categories=["Cc", "Cf", "Zl", "Zp"])
HOSTILE_NAMES = st.text(st.one_of(HIDDEN, st.characters()), max_size=30)


@given(HOSTILE_NAMES)
def test_visible_text_hides_nothing_and_keeps_printable_text(text: str) -> None:
    shown = visible(text)
    assert not any(unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"} for ch in shown)
    if text.isprintable():
        assert shown == text


def _apply_report(path: str, comm: str, message: str) -> ApplyReport:
    return ApplyReport.model_validate(
        {
            "dryRun": True,
            "policies": [{"name": "p", "generation": 1}],
            "tmpfs": [
                {
                    "path": path,
                    "pattern": "/x/*",
                    "policy": "p",
                    "state": "Refused",
                    "message": message,
                }
            ],
            "cleanup": [
                {
                    "name": "c",
                    "policy": "p",
                    "dryRun": True,
                    "wouldRemove": [path],
                    "heldOpen": [{"path": path, "bytes": 1, "pids": [{"pid": 2, "comm": comm}]}],
                    "errors": [message],
                }
            ],
            "oom": {
                "rules": [{"name": "r", "policy": "p", "matched": 1, "failed": 1}],
                "matched": 1,
                "failed": 1,
                "failures": [
                    {"rule": "r", "pid": 7, "comm": comm, "state": "Failed", "message": message}
                ],
            },
        }
    )


@given(HOSTILE_NAMES, HOSTILE_NAMES, HOSTILE_NAMES)
def test_a_hostile_name_cannot_add_a_line_to_the_text_report(
    path: str, comm: str, message: str
) -> None:
    plain = apply_report_text(_apply_report("/x/a", "c", "m"))
    hostile = apply_report_text(_apply_report(path, comm, message))
    assert len(hostile.splitlines()) == len(plain.splitlines())


def test_a_forged_line_shows_as_one_escaped_cell() -> None:
    text = apply_report_text(_apply_report("/x/a\n/x/b  Applied", "c\x1b[2J", "m\u202e"))
    assert "/x/a\\n/x/b  Applied" in text
    assert "c\\x1b[2J" in text and "m\\u202e" in text
