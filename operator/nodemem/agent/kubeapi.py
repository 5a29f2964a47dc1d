"""The agent's one client of the API server: JSON requests and watch streams.

Everything the agent says to the API goes through `RawApi` on the official client's
`ApiClient` (its login: token, client certificate, CA; its connection pool), without the
generated API classes and models: importing CoreV1Api loads hundreds of model modules,
MiBs of RSS in an agent on every node (README, Performance: bench/agent_load.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from kubernetes import client as k8s
from kubernetes.watch.watch import iter_resp_lines

GROUP, VERSION = "nodemem.dev", "v1alpha1"
POLICIES, REPORTS = "nodememorypolicies", "nodememoryreports"
POLICIES_PATH = f"/apis/{GROUP}/{VERSION}/{POLICIES}"
REPORTS_PATH = f"/apis/{GROUP}/{VERSION}/{REPORTS}"
MAX_BACKOFF = 60.0


class Backoff:
    """A pause after a failure: 1 s, doubling up to `maximum`; a success resets it."""

    def __init__(self, initial: float = 1.0, maximum: float = MAX_BACKOFF) -> None:
        self.initial = initial
        self.maximum = maximum
        self.delay = 0.0

    def next_delay(self) -> float:
        return min(self.maximum, max(self.initial, self.delay * 2))

    def failed(self, stop: threading.Event) -> None:
        self.delay = self.next_delay()
        stop.wait(self.delay)

    def succeeded(self) -> None:
        self.delay = 0.0


class RawApiError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status


class WatchStream:
    """One open watch: its events as dicts, until the server ends it (timeoutSeconds).

    `shutdown()` (from another thread) ends the iteration at once: the agent stopping
    need not wait for the server's timeout."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for line in iter_resp_lines(self._response):  # type: ignore[no-untyped-call]
                if line:
                    yield json.loads(line)
        finally:
            self._response.release_conn()

    def shutdown(self) -> None:
        self._response.shutdown()


class RawApi:
    """JSON requests to the API server through the official client's `ApiClient`."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client

    def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: dict[str, Any] | None = None,
        *,
        timeout: float | tuple[float, float] | None = 30.0,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, payload, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api_client.call_api(
            method, url, header_params=headers, body=payload, _request_timeout=timeout
        )

    def json(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: dict[str, Any] | None = None,
        *,
        content_type: str = "application/json",
    ) -> Any:
        """The answer's JSON; RawApiError for any status but 2xx."""
        response = self._request(method, path, query, body, content_type=content_type)
        data: bytes = response.read()
        if not 200 <= response.status < 300:
            raise RawApiError(response.status, data)
        return json.loads(data)

    def watch(
        self, path: str, query: Sequence[tuple[str, str]], *, timeout_seconds: int
    ) -> WatchStream:
        """Open a watch the server ends after `timeout_seconds`; RawApiError if refused.

        The read timeout outlasts the server's: with nothing to tell (and no bookmark
        due) a watch is silent until its end, and that is no failure."""
        response = self._request(
            "GET",
            path,
            [*query, ("watch", "true"), ("timeoutSeconds", str(timeout_seconds))],
            timeout=(10.0, timeout_seconds + 30.0),
        )
        if not 200 <= response.status < 300:
            raise RawApiError(response.status, response.read())
        return WatchStream(response.response)
