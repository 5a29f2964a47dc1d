"""The last policies in force, kept on the host (a hostPath in the chart).

Loaded at start, so that oom rules keep applying to new processes and cleanups keep
running while the API server is unreachable, and after a restart.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from nodemem.agent.policy_file import read_capped, read_policy_file
from nodemem.api.manifest import PolicyError, decode_manifest, policy_to_manifest
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
        """The saved labels; None when there are none or the file is unusable (then it
        is set aside: see `_set_aside`)."""
        path = self.path / NODE_LABELS_FILE
        try:
            labels = yaml.safe_load(decode_manifest(read_capped(path)))
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read saved node labels %s: %s", path, exc.strerror or exc)
            return None
        except (PolicyError, yaml.YAMLError, RecursionError) as exc:
            self._set_aside(NODE_LABELS_FILE, str(exc))
            return None
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            self._set_aside(NODE_LABELS_FILE, "not a mapping of label names to strings")
            return None
        return labels

    def _set_aside(self, name: str, reason: str) -> None:
        """A corrupt state file is renamed, never fatal: the agent starts without it (the
        API brings the state back), and the bytes stay for whoever wants to look."""
        aside = self.path / f"{name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.replace(self.path / name, aside)
        except OSError as exc:
            log.error(
                "state file %s is unusable (%s); setting it aside failed: %s",
                self.path / name,
                reason,
                exc.strerror or exc,
            )
            return
        log.error(
            "state file %s is unusable, set aside as %s: %s", self.path / name, aside.name, reason
        )

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
        """The saved policies; None when there are none (first start) or they are unusable
        (then the file is set aside)."""
        try:
            return read_policy_file(self.policies_file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read saved policies %s: %s", self.policies_file, exc)
            return None
        except PolicyError as exc:
            self._set_aside(POLICIES_FILE, str(exc))
            return None
