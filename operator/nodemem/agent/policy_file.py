"""Policies from a manifest file, re-read when it changes (standalone agent)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from nodemem.api.manifest import MAX_MANIFEST_BYTES, PolicyError, load_policy_bytes
from nodemem.api.policy import NodeMemoryPolicy

log = logging.getLogger("nodemem.agent")


def read_capped(path: Path) -> bytes:
    """A manifest or state file's bytes; one byte past the cap is enough to refuse it
    (a 10 GB file is never read whole). Raises OSError."""
    with open(path, "rb") as file:
        return file.read(MAX_MANIFEST_BYTES + 1)


def read_policy_file(path: Path) -> list[NodeMemoryPolicy]:
    """The policies in a manifest file; raises OSError or PolicyError (never a decoding
    error: a byte that is not UTF-8 is a PolicyError naming where it is)."""
    return load_policy_bytes(read_capped(path))


class PolicyFile:
    """A PolicySource: the file's policies when it changed since the last call, else None.

    An invalid or unreadable file keeps the last good policies in force (and says why):
    a typo in an edit must not lift every limit on the node.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self.last_error: str | None = None  # why the file's current version is not in force

    def __call__(self) -> Sequence[NodeMemoryPolicy] | None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._seen != (0, 0, 0):
                self.last_error = f"cannot read {self.path}: {exc.strerror}"
                log.error("%s: keeping the policies in force", self.last_error)
                self._seen = (0, 0, 0)
            return None
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if version == self._seen:
            return None
        self._seen = version
        try:
            policies = read_policy_file(self.path)
        except OSError as exc:
            self.last_error = f"cannot read {self.path}: {exc.strerror or exc}"
            log.error("%s: keeping the policies in force", self.last_error)
            return None
        except PolicyError as exc:
            self.last_error = f"invalid policy file {self.path}:\n{exc}"
            log.error("%s\nkeeping the policies in force", self.last_error)
            return None
        self.last_error = None
        return policies
