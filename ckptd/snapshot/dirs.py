"""Where a snapshot lives in a local tier, from first byte to commit (no torch).

``<root>/.attempts/step-N-<attempt>/``  one write attempt in progress; only its writer touches it
``<root>/step-N/``                       a committed snapshot holding every rank's files (renamed into
                                         place, never over an existing one)
``<root>/.partial/step-N-<attempt>/``    this node's ranks' files of a snapshot whose other ranks
                                         wrote on other nodes: upload source only, never restored

A committed directory appears by one atomic rename of a finished attempt,
so ``step-N/`` is always whole and a crash leaves only an attempt behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .manifest import Manifest, check_attempt, step_dir

ATTEMPTS = ".attempts"
PARTIAL = ".partial"
DOWNLOADS = ".download-"
"""Prefix of a download in progress (``.download-step-N-<random>``), renamed to ``step-N/`` when verified."""
_NAMED = re.compile(r"^step-(\d{12})-([0-9a-f]{8,32})$")


def attempt_dir(step: int, attempt: str) -> str:
    """Key (relative path) of an attempt's working directory."""
    return f"{ATTEMPTS}/{step_dir(step)}-{check_attempt(attempt)}"


def partial_dir(step: int, attempt: str) -> str:
    """Key of a node's committed share of a snapshot written on several nodes."""
    return f"{PARTIAL}/{step_dir(step)}-{check_attempt(attempt)}"


def parse_named(name: str) -> tuple[int, str] | None:
    """(step, attempt) of an attempt or partial directory name, None for any other name."""
    m = _NAMED.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class LocalCommit:
    """A snapshot committed to this node's local tier, and where its files are."""

    manifest: Manifest
    data: bytes
    """The manifest's bytes, identical on every rank."""
    directory: str
    """Absolute path of the committed directory on this node."""
    whole: bool
    """True: ``directory`` is ``step-N/`` with every rank's files; False: this node's share."""
