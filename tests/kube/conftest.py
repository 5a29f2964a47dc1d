"""Fixtures for tests against the Kubernetes API emulator (``emulator.py``).

- ``kube_server``: a running :class:`EmulatorThread` on 127.0.0.1 with a free port,
  built-in kinds declared (DEFAULT_BUILTINS), the usual namespaces created, and
  nodemem's CRDs from ``crds/`` registered (validated by ``crd_schema.CrdValidator``
  when it exists). Configure it per test with
  ``@pytest.mark.kube_emulator(history_limit=5, bookmark_interval=0.1, crds=[...])``.
  Teardown fails the test if the emulator itself raised (a bug in it).
- ``kube``: its :class:`KubeEmulator` (in-process API, request counting, CRDs).
- ``kube_url``, ``kubeconfig`` (a file), ``api_client`` (official ``ApiClient``).
- ``run_kopf``: starts a :class:`KopfThread` for a registry; stops it at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from emulator import (
    EmulatorThread,
    KopfThread,
    KubeEmulator,
    api_client_for,
    make_emulator,
    write_kubeconfig,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kube_emulator(**options): options for the kube_server fixture's KubeEmulator "
        "(and crds=[...] instead of the files in crds/)",
    )


@pytest.fixture
def kube_server(request: pytest.FixtureRequest) -> Iterator[EmulatorThread]:
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("kube_emulator"))):
        options.update(marker.kwargs)
    server = EmulatorThread(make_emulator(**options)).start()
    try:
        yield server
    finally:
        server.stop()
    errors = server.emulator.server_errors
    if errors:
        pytest.fail(f"the emulator failed while serving: {errors!r}", pytrace=False)


@pytest.fixture
def kube(kube_server: EmulatorThread) -> KubeEmulator:
    return kube_server.emulator


@pytest.fixture
def kube_url(kube_server: EmulatorThread) -> str:
    return kube_server.url


@pytest.fixture
def kubeconfig(kube_server: EmulatorThread, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", kube_server.url)


@pytest.fixture
def api_client(kube_server: EmulatorThread) -> Iterator[kubernetes.client.ApiClient]:
    client = api_client_for(kube_server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def run_kopf(kube_server: EmulatorThread) -> Iterator[Callable[..., KopfThread]]:
    started: list[KopfThread] = []

    def run(registry: Any, **options: Any) -> KopfThread:
        operator = KopfThread(registry, kube_server.url, **options)
        started.append(operator)
        return operator.start()

    try:
        yield run
    finally:
        for operator in reversed(started):
            operator.stop()
