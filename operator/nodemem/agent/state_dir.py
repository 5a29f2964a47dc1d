"""The last policies in force, kept on the host (a hostPath in the chart).

Loaded at start, so that oom rules keep applying to new processes and cleanups keep
running while the API server is unreachable, and after a restart.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from nodemem.api.manifest import PolicyError, load_policies, policy_to_manifest
from nodemem.api.policy import NodeMemoryPolicy

log = logging.getLogger("nodemem.agent")
POLICIES_FILE = "policies.yaml"


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def policies_file(self) -> Path:
        return self.path / POLICIES_FILE

    def save_policies(self, policies: Sequence[NodeMemoryPolicy]) -> None:
        """Write atomically: a crash mid-write leaves the previous file, never half a one."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = (
            yaml.safe_dump_all([policy_to_manifest(p) for p in policies], sort_keys=False)
            if policies
            else ""
        )
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".policies-")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.policies_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_policies(self) -> list[NodeMemoryPolicy] | None:
        """The saved policies; None when there are none (first start) or they are unusable."""
        try:
            text = self.policies_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read saved policies %s: %s", self.policies_file, exc)
            return None
        try:
            return load_policies(text)
        except PolicyError as exc:
            log.error("saved policies %s are invalid, ignored: %s", self.policies_file, exc)
            return None
