"""The last policies in force, kept on the host (a hostPath in the chart).

Loaded at start, so that oom rules keep applying to new processes and cleanups keep
running while the API server is unreachable, and after a restart.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from nodemem.api.manifest import PolicyError, load_policies, policy_to_manifest
from nodemem.api.policy import NodeMemoryPolicy

log = logging.getLogger("nodemem.agent")
POLICIES_FILE = "policies.yaml"
NODE_LABELS_FILE = "node-labels.yaml"


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def policies_file(self) -> Path:
        return self.path / POLICIES_FILE

    def save_policies(self, policies: Sequence[NodeMemoryPolicy]) -> None:
        documents = [policy_to_manifest(p) for p in policies]
        self._write(
            POLICIES_FILE, yaml.safe_dump_all(documents, sort_keys=False) if documents else ""
        )

    def save_node_labels(self, labels: Mapping[str, str]) -> None:
        """The node's labels decide which policies select it: without the API they are
        known only from here."""
        self._write(NODE_LABELS_FILE, yaml.safe_dump(dict(labels)))

    def load_node_labels(self) -> dict[str, str] | None:
        try:
            labels = yaml.safe_load((self.path / NODE_LABELS_FILE).read_text())
        except (OSError, yaml.YAMLError):
            return None
        if not isinstance(labels, dict):
            return None
        return {str(k): str(v) for k, v in labels.items()}

    def _write(self, name: str, text: str) -> None:
        """Write atomically: a crash mid-write leaves the previous file, never half a one."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}-")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path / name)
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
