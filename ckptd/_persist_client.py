"""The hook's side of persistence: local commits become durable through the daemon or this process.

With a node daemon the hook reports each local commit over the socket and
learns from heartbeat replies which steps are durable or failed; when the
daemon goes away, the tiers take over its unfinished uploads. Without one,
the tiers' own uploader does the same work in this process.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

from .persist.tiers import Tiers
from .snapshot.dirs import LocalCommit

log = logging.getLogger("ckptd")


class PersistClient:
    """Tiers plus an optional daemon link. Thread-safe (the link serialises its requests)."""

    def __init__(self, tiers: Tiers, link: Any | None) -> None:
        self.tiers = tiers
        self._link = link

    @property
    def uses_daemon(self) -> bool:
        return self._link is not None

    def committed(self, done: LocalCommit) -> Future:
        """A snapshot was committed locally; the future completes when it is durable."""
        durable = self.tiers.committed(done)
        link = self._link
        if link is not None:  # a local store's commit is durable; the daemon still tracks the last snapshot
            try:
                link.committed(done.manifest.step, done.directory)
            except (OSError, ValueError) as e:
                self._lost(e)
        return durable

    def heartbeat(self, step: int, step_time: float | None, *, force: bool = False) -> list:
        """Heartbeat the daemon; apply its durability reports; return its commands."""
        link = self._link
        if link is None:
            return []
        try:
            reply = link.heartbeat(step, step_time, force=force)
        except (OSError, ValueError) as e:
            self._lost(e)
            return []
        if reply is None:
            return []
        for s in reply.durable:
            self.tiers.mark_durable(s)
        for f in reply.failed:
            self.tiers.mark_failed(f.step, f.error)
        return list(reply.commands)

    def wait_reported(self, futures: list[Future], step: int, deadline: float | None) -> None:
        """With a daemon, ask it for reports until ``futures`` are done or ``deadline`` passes."""
        while self._link is not None and not all(f.done() for f in futures):
            if deadline is not None and time.monotonic() >= deadline:
                return
            self.heartbeat(step, None, force=True)
            time.sleep(0.1)

    def _lost(self, e: BaseException) -> None:
        log.warning("ckptd: lost the daemon (%s); uploading from this process from now on", e)
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self.tiers.take_over()

    def close(self, *, wait: bool) -> None:
        self.tiers.close(wait=wait)
        if self._link is not None:
            self._link.close()
            self._link = None
