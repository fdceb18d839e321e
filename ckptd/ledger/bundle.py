"""Bundles: many of a job's ledger pages in one object, so a long job's ledger stays a few reads.

A writer makes a page per flush (a few a minute per job), so a month of a
job is ~10^5 small objects, each a request for every fresh reader.
``bundle_pages`` copies the pages a reader accepted into bundles of up to
BUNDLE_PAGES pages, reads each bundle back, and only then deletes the loose
pages it holds (a page the reader refused stays loose, and named). A reader
takes a page from a bundle only where the loose page is gone, and each page
once however many bundles hold it, so a crash or two bundlers at once cost a
duplicate object, never a record counted twice or lost.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import LedgerCorrupt
from ..store.base import Store
from .record import Page, check_job, parse_page

FORMAT = "ckptd-ledger-bundle/1"
BUNDLE_PAGES = 4096
"""Pages per bundle at most: a month of a job in a few dozen objects."""
MAX_BUNDLE_BYTES = 64 << 20
"""A bundle's size at most; a reader refuses a larger object unread."""
BUNDLE_AT = 512
"""Loose pages of a job before the daemon or ``ckptd goodput`` bundles them."""
PAGE_NAME = re.compile(r"^\d{13}-(hook|run|daemon)-[0-9a-f]{8}-\d{6}\.json$")


@dataclass(frozen=True)
class Bundled:
    """What one ``bundle_pages`` call did."""

    pages: int
    bundles: int


def bundle_key(prefix: str, newest_page: str) -> str:
    """A bundle's key sorts with the newest page it holds."""
    return f"{prefix}/{newest_page[:13]}-bundle-{uuid.uuid4().hex[:8]}.json"


def encode_bundle(job: str, pages: list[tuple[str, bytes]]) -> bytes:
    """``pages``: (page name, the page's bytes as stored), kept verbatim so the one page gate reads them."""
    return json.dumps(
        {"format": FORMAT, "job": check_job(job), "pages": [[name, data.decode()] for name, data in pages]},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def parse_bundle(data: bytes, *, source: str, job: str) -> dict[str, Page]:
    """Page name -> page of a bundle of ``job``; LedgerCorrupt (the whole bundle) on any defect."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise LedgerCorrupt(f"ledger bundle {source} is {len(data)} bytes, over {MAX_BUNDLE_BYTES}; remove it")
    try:
        raw = json.loads(data, parse_constant=_no_constant)
        if not isinstance(raw, dict) or set(raw) != {"format", "job", "pages"}:
            raise ValueError("not a ledger bundle (format, job, pages)")
        if raw["format"] != FORMAT:
            raise ValueError(f"format {str(raw['format'])[:40]!r} is not {FORMAT} (written by another ckptd version)")
        if raw["job"] != job:
            raise ValueError(f"it names job {str(raw['job'])[:40]!r}, but lies under job {job}")
        items = raw["pages"]
        if not isinstance(items, list) or len(items) > BUNDLE_PAGES:
            raise ValueError(f"pages must be a list of at most {BUNDLE_PAGES}")
        out: dict[str, Page] = {}
        for item in items:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise ValueError("each page must be [name, text]")
            name, text = item
            match = PAGE_NAME.match(name)
            if match is None:
                raise ValueError(f"{name[:60]!r} is not a ledger page's name")
            page = parse_page(text.encode(), source=f"{source}:{name}")
            if (page.job, page.source) != (job, match.group(1)):
                raise ValueError(f"page {name} is of job {page.job} by the {page.source}")
            out[name] = page
    except (ValueError, TypeError, LedgerCorrupt, RecursionError) as e:
        raise LedgerCorrupt(f"ledger bundle {source} is not valid: {e}; remove it (readers skip it)") from e
    return out


def bundle_pages(store: Store, prefix: str, job: str, pages: list[tuple[str, Page]]) -> Bundled:
    """Write ``pages`` (name, page as a reader accepted it) of ``job`` into bundles under ``prefix``.

    Each bundle is read back whole before the loose pages it holds are deleted; one that is not is
    removed again, and its pages stay loose.
    """
    pages = sorted(pages, key=lambda p: p[0])
    done = bundles = 0
    batch: list[tuple[str, bytes]] = []
    size = 0

    def flush() -> None:
        nonlocal done, bundles, batch, size
        if not batch:
            return
        key = bundle_key(prefix, batch[-1][0])
        store.put_bytes(key, encode_bundle(job, batch))
        try:
            held = parse_bundle(store.get_bytes(key), source=key, job=job)
            if set(held) != {name for name, _ in batch}:
                raise LedgerCorrupt(f"ledger bundle {key} did not read back whole; its pages stay loose")
        except BaseException:
            store.delete([key])
            raise
        store.delete([f"{prefix}/{name}" for name, _ in batch])
        done, bundles, batch, size = done + len(batch), bundles + 1, [], 0

    for name, page in pages:
        data = page.to_json()
        if len(batch) == BUNDLE_PAGES or size + len(data) * 2 + 64 > MAX_BUNDLE_BYTES:
            flush()
        batch.append((name, data))
        size += len(data) * 2 + 64  # a string inside JSON: quotes escaped, at most twice the bytes
    flush()
    return Bundled(done, bundles)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a ledger holds")
