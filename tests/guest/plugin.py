"""The host's pytest run and the cgroup-v2 guest (registered by tests/conftest.py).

On the host, the tests marked `guest_v2` are not run here: the first of them boots the
guest once for all of them (run.py), pytest inside runs exactly those node ids and
writes each report (pytest's own serialisation, as xdist does) into the shared dir, and
each item's setup/call/teardown reports are replayed here. Inside the guest
(NODEMEM_IN_GUEST=1) every test runs as usual.

`guest_also` tests get a [host] and a [guest] variant, the latter marked guest_v2;
those using the v1-only memcg_root fixture stay on the host.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from guest import run

IN_GUEST = os.environ.get("NODEMEM_IN_GUEST") == "1"
REQUIRE_PRIVILEGED = os.environ.get("NODEMEM_REQUIRE_PRIVILEGED") == "1"
RESULTS_ENV = "NODEMEM_GUEST_RESULTS"
GUEST_TIMEOUT = 900.0  # s; the whole guest set takes a few minutes under TCG


@pytest.fixture(autouse=True)
def nodemem_where(request: pytest.FixtureRequest) -> str:
    """ "host" or "guest": which variant of a guest_also test this is."""
    return str(getattr(request, "param", "host"))


class GuestTier:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.reports: dict[str, list[pytest.TestReport]] | None = None
        self.failure = ""  # why the guest run gave no report, for each test it owes
        self.seconds = 0.0
        self.count = 0
        self.results_file = os.environ.get(RESULTS_ENV) if IN_GUEST else None

    # --- both sides ---------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if metafunc.definition.get_closest_marker("guest_also") is None:
            return
        where = [pytest.param("host", id="host")]
        if "memcg_root" not in metafunc.fixturenames:
            where.append(pytest.param("guest", id="guest", marks=pytest.mark.guest_v2))
        metafunc.parametrize("nodemem_where", where, indirect=True)

    # --- inside the guest ---------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.results_file is None:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with open(self.results_file, "a") as results:
            results.write(json.dumps(data) + "\n")

    # --- on the host --------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if IN_GUEST or item.get_closest_marker("guest_v2") is None:
            return None
        if self.reports is None:
            self._run_guest(item.session)
        assert self.reports is not None
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.get(item.nodeid) or self._missing(item)
        for report in reports:
            item.ihook.pytest_runtest_logreport(report=report)
        # The host item before this one kept the collectors this one shares with it set up
        # (its teardown stopped at them): take down what the next item does not need, as
        # pytest's own protocol would, or the next host item finds them still set up.
        item.session._setupstate.teardown_exact(nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_guest(self, session: pytest.Session) -> None:
        self.reports = {}
        ids = [item.nodeid for item in session.items if item.get_closest_marker("guest_v2")]
        self.count = len(ids)
        reason = run.unavailable()
        if reason is not None:
            self.failure = f"the cgroup-v2 guest cannot run here: {reason}"
            return
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="nodemem-guest-") as share_dir:
            share = Path(share_dir)
            results = share / "results.jsonl"
            argv = [*run.PYTEST, "-q", *ids]
            try:
                status = run.boot(
                    argv,
                    share,
                    cwd=self.config.rootpath,
                    timeout=GUEST_TIMEOUT,
                    stream=False,
                    env={RESULTS_ENV: str(results)},
                )
            except run.GuestUnavailableError as exc:
                self.failure = f"the cgroup-v2 guest did not run: {exc}"
                status = None
            output = (
                (share / "output").read_text(errors="replace")
                if (share / "output").exists()
                else ""
            )
            if status is not None:
                self.failure = f"no result from the guest (pytest exit {status}):\n{output[-3000:]}"
            if results.exists():
                for line in results.read_text().splitlines():
                    report = self.config.hook.pytest_report_from_serializable(
                        config=self.config, data=json.loads(line)
                    )
                    self.reports.setdefault(report.nodeid, []).append(report)
        self.seconds = time.monotonic() - started

    def _missing(self, item: pytest.Item) -> list[pytest.TestReport]:
        """A test the guest owes a result for: a failure in CI, a skip elsewhere when the
        guest cannot boot here (no root, no qemu)."""
        unavailable = run.unavailable() is not None
        if unavailable and not REQUIRE_PRIVILEGED:
            path, lineno, _name = item.location
            longrepr: Any = (str(path), (lineno or 0) + 1, f"Skipped: {self.failure}")
            outcome: Literal["skipped", "failed"] = "skipped"
        else:
            longrepr = self.failure or "the guest reported nothing for this test"
            outcome = "failed"
        when: Literal["setup", "call"] = "setup" if outcome == "skipped" else "call"
        return [
            pytest.TestReport(
                nodeid=item.nodeid,
                location=item.location,
                keywords=dict.fromkeys(item.keywords, 1),
                outcome=outcome,
                longrepr=longrepr,
                when=when,
                sections=[],
            )
        ]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.reports is None or not self.count:
            return
        if self.seconds:
            terminalreporter.write_line(
                f"guest_v2: {self.count} tests in one cgroup-v2 guest boot, "
                f"{self.seconds:.1f} s (qemu TCG)"
            )
