"""The list-watch loop: how the agent follows the policies, its own Node and its pods.

One thread per feed, for as long as the agent runs:

- LIST (the authoritative set: `on_list`), then WATCH from the list's resourceVersion
  (each change: `on_event`), with allowWatchBookmarks=true: a bookmark's resourceVersion
  is kept like an event's, so the next watch resumes from there and not from an old
  version the server may have forgotten.
- The server ends a watch after timeoutSeconds: the next one resumes from the last
  version, without a LIST.
- 410 Gone (an ERROR event in the stream, or the watch request's own status): the version
  is older than the server keeps (after a restart of the API server, a compaction): LIST
  again at once.
- Every `relist_seconds` (when set): LIST again, even with the watch healthy (the policy
  feed: a deletion no watch event told of).
- Any other failure (the API away, 5xx, 429, 403, a broken stream, an ERROR event):
  counted (`nodemem_api_errors_total{operation}`), a pause of 1 s doubling up to 60 s
  (reset by an answered LIST or a watch that delivered), then the same step again: the
  watch from the last version when there is one (a 410 there means LIST), else the LIST.

The callbacks run in the feed's thread: they only record what they are told, under
their own locks, and the agent's loop takes it from there; enforcement never waits for
the API.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from nodemem.agent.kubeapi import Backoff, RawApi, RawApiError, WatchStream
from nodemem.agent.metrics import AgentMetrics

log = logging.getLogger("nodemem.agent")

WATCH_TIMEOUT = 60  # seconds the server keeps one watch open


class GoneError(Exception):
    """410: the resourceVersion watched from is no longer known to the server."""


class ListWatch:
    """LIST then WATCH one resource (optionally one field selector of it), forever."""

    def __init__(
        self,
        api: RawApi,
        path: str,
        *,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        operation: str,
        field_selector: str | None = None,
        relist_seconds: float | None = None,
        metrics: AgentMetrics | None = None,
        watch_timeout: int = WATCH_TIMEOUT,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.path = path
        self.on_list = on_list
        self.on_event = on_event
        self.operation = operation
        self.selector = [("fieldSelector", field_selector)] if field_selector else []
        self.relist_seconds = relist_seconds
        self.metrics = metrics
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.version: str | None = None  # the next watch resumes from it; None: LIST
        self.lists = 0  # LISTs answered
        self.bookmarks = 0  # bookmarks received
        self._next_list = 0.0
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set (then `interrupt()` ends an open watch at once)."""
        while not stop.is_set():
            try:
                if self.version is None or self._relist_due():
                    self._list()
                    listed = True
                else:
                    listed = False
                self._watch(stop, fresh=listed)
            except GoneError as exc:
                if stop.is_set():
                    return
                log.info("%s: %s; listing again", self.operation, exc)
                self.version = None
            except Exception as exc:  # the API away, refused, a broken stream: pause
                if stop.is_set():
                    return
                if self.metrics is not None:
                    self.metrics.api_errors.labels(operation=self.operation).inc()
                log.warning(
                    "%s: %s; retrying in %.0f s", self.operation, exc, self.backoff.next_delay()
                )
                self.backoff.failed(stop)

    def start(self, stop: threading.Event) -> threading.Thread:
        """`run` in a daemon thread of its own, named after the operation."""
        thread = threading.Thread(target=self.run, args=(stop,), name=self.operation, daemon=True)
        thread.start()
        return thread

    def interrupt(self) -> None:
        """End the open watch now (call after setting `stop`, from any thread)."""
        with self._lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # already ended or released
                stream.shutdown()

    def _relist_due(self) -> bool:
        return self.relist_seconds is not None and self.clock() >= self._next_list

    def _list(self) -> None:
        listed = self.api.json("GET", self.path, self.selector)
        version = listed["metadata"]["resourceVersion"]
        self.on_list(listed.get("items") or [])
        self.lists += 1
        self.version = version
        if self.relist_seconds is not None:
            self._next_list = self.clock() + self.relist_seconds
        self.backoff.succeeded()

    def _watch(self, stop: threading.Event, *, fresh: bool) -> None:
        """One watch from `self.version`, until the server ends it (or a relist is due).

        `fresh`: the version is a LIST's just answered; a 410 for it is no reason to
        LIST again at once (that would be a tight loop), but a failure to back off."""
        assert self.version is not None
        timeout = self.watch_timeout
        if self.relist_seconds is not None:
            timeout = max(1, min(timeout, math.ceil(self._next_list - self.clock())))
        query = [
            *self.selector,
            ("resourceVersion", self.version),
            ("allowWatchBookmarks", "true"),
        ]
        try:
            stream = self.api.watch(self.path, query, timeout_seconds=timeout)
        except RawApiError as exc:
            if exc.status == 410 and not fresh:
                raise GoneError(str(exc)) from exc
            raise
        with self._lock:
            self._stream = stream
        try:
            if stop.is_set():  # set before the stream was there to interrupt
                return
            for event in stream:
                if stop.is_set():
                    return
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    code = int(obj.get("code") or 0)
                    message = str(obj.get("message") or "watch error")
                    if code == 410 and not fresh:
                        raise GoneError(message)
                    raise RawApiError(code, message.encode())
                version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    self.bookmarks += 1
                else:
                    self.on_event(str(kind), obj)
                self.version = version  # only once told: a failed event comes again
                fresh = False
                self.backoff.succeeded()
        finally:
            with self._lock:
                self._stream = None
