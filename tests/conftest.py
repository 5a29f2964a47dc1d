"""Suite-wide fixtures: the privileged marker and its skip-or-fail rule."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest.plugin import GuestTier, nodemem_where  # noqa: F401 (a fixture, used by name)

REQUIRE_PRIVILEGED = os.environ.get("NODEMEM_REQUIRE_PRIVILEGED") == "1"


def _missing_privilege() -> str | None:
    """Why this process cannot run privileged tests, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mounts, setns, memory cgroups)"
    try:
        with open("/proc/self/status") as status:
            caps = next(line for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return "cannot read /proc/self/status"
    cap_sys_admin = 21
    if not int(caps.split()[1], 16) & (1 << cap_sys_admin):
        return "needs CAP_SYS_ADMIN (mount, setns)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    # guest_v2 tests run in one cgroup-v2 guest boot per session (tests/guest/plugin.py).
    config.pluginmanager.register(GuestTier(config), "nodemem-guest")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_privilege()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("privileged") is None:
            continue
        if not REQUIRE_PRIVILEGED:  # in CI the gate fixture below fails the test instead
            item.add_marker(pytest.mark.skip(reason=f"privileged test: {reason}"))


@pytest.fixture(autouse=True)
def _privileged_gate(request: pytest.FixtureRequest) -> None:
    """In CI a privileged test that cannot run is a failure, never a silent skip."""
    if request.node.get_closest_marker("privileged") is None:
        return
    reason = _missing_privilege()
    if reason is not None and REQUIRE_PRIVILEGED:
        pytest.fail(f"NODEMEM_REQUIRE_PRIVILEGED=1 but {reason}", pytrace=False)


@pytest.fixture(autouse=True)
def _state_dir_of_the_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`nodemem apply` and the standalone agent record originals in the default state dir:
    in a test (and the commands it starts) that is the test's own, never /var/lib/nodemem."""
    state = tmp_path / "nodemem-state"
    monkeypatch.setenv("NODEMEM_STATE_DIR", str(state))
    return state


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


MountTmpfs = Callable[..., Path]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[MountTmpfs]:
    """mount_tmpfs(name, options="size=64m") -> mount point under tmp_path; unmounted after."""
    mounted: list[Path] = []

    def mount(name: str = "mnt", options: str = "size=64m", at: Path | None = None) -> Path:
        point = at or tmp_path / name
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "nodemem-test", str(point)],
            check=True,
            capture_output=True,
        )
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        _umount(point)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (append them); killed and reaped by PID after it, all
    signalled before any is waited for (a memcg empties at once), their pipes closed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()  # a no-op for one already reaped
    for process in started:
        process.wait(timeout=30)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
