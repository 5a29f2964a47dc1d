"""The host side of the guest tier (tests/guest/plugin.py): a guest that cannot boot
fails each guest_v2 test in CI and skips it, with the reason, elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_TEST = "tests/host/test_shmem_tracker.py::test_scan_node_is_always_a_full_pass[guest]"


def _pytest_without_a_guest(tmp_path: Path, require: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NODEMEM_GUEST_CACHE": str(tmp_path / "nothing-built")}
    env["NODEMEM_REQUIRE_PRIVILEGED"] = require
    env.pop("NODEMEM_IN_GUEST", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", GUEST_TEST],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_a_guest_that_cannot_boot_fails_in_ci(tmp_path: Path) -> None:
    result = _pytest_without_a_guest(tmp_path, "1")
    assert result.returncode == 1, result.stdout
    assert f"FAILED {GUEST_TEST}" in result.stdout
    assert "the cgroup-v2 guest cannot run here" in result.stdout


def test_a_guest_that_cannot_boot_skips_with_the_reason_elsewhere(tmp_path: Path) -> None:
    result = _pytest_without_a_guest(tmp_path, "")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    assert "the cgroup-v2 guest cannot run here" in result.stdout
