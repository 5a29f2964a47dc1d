"""Policies from a manifest file, re-read when it changes (standalone agent)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from nodemem.api.manifest import PolicyError, load_policies
from nodemem.api.policy import NodeMemoryPolicy

log = logging.getLogger("nodemem.agent")


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
            policies = load_policies(self.path.read_text())
        except (OSError, PolicyError) as exc:
            self.last_error = f"invalid policy file {self.path}:\n{exc}"
            log.error("%s\nkeeping the policies in force", self.last_error)
            return None
        self.last_error = None
        return policies
