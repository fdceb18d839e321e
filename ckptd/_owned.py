"""Resources acquired in order and released newest first, for the hook's collaborators."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("ckptd")
T = TypeVar("T")


class Owned:
    """A stack of undo callbacks. ``release()`` runs them newest first; one that fails is logged and the
    rest still run, so a constructor that fails half-way leaks nothing. Not thread-safe."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._undo: list[Callable[[], object]] = []

    def add(self, undo: Callable[[], object]) -> None:
        self._undo.append(undo)

    def keep(self, resource: T, close: Callable[[T], object]) -> T:
        """Own ``resource``: ``close(resource)`` runs at release. Returns it."""
        self._undo.append(lambda: close(resource))
        return resource

    def release(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception:
                log.exception("ckptd: while releasing %s", self._what)
