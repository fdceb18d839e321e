"""Bundles: many of a job's ledger pages in one object, so a long job's ledger stays a few reads.

A writer makes a page per flush (about one a minute per writer), so a month
of a job is ~10^5 small objects, each a request for every fresh reader.
``bundle_pages`` copies the loose pages, verbatim, into bundles of up to
BUNDLE_PAGES pages, reads each bundle back, and only then deletes the pages
it holds. A reader takes a page from a bundle only where the loose page is
gone, and each page once however many bundles hold it, so a crash or two
bundlers at once cost a duplicate object, never a record counted twice or lost.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass

from ..errors import LedgerCorrupt, StoreError
from ..store.base import ObjectInfo, Store
from .record import MAX_PAGE_BYTES, Page, check_job, parse_page

log = logging.getLogger("ckptd")

FORMAT = "ckptd-ledger-bundle/1"
BUNDLE_PAGES = 4096
"""Pages per bundle at most: a month of a job in a few dozen objects."""
MAX_BUNDLE_BYTES = 64 << 20
"""A bundle's size at most; a reader refuses a larger object unread."""
BUNDLE_AT = 512
"""Loose pages of a job before the daemon or ``ckptd goodput`` bundles them."""
PAGE_NAME = re.compile(r"^\d{13}-(hook|run|daemon)-[0-9a-f]{8}-\d{6}\.json$")
BUNDLE_NAME = re.compile(r"^\d{13}-bundle-[0-9a-f]{8}\.json$")


@dataclass(frozen=True)
class Bundled:
    """What one ``bundle_pages`` call did."""

    pages: int
    bundles: int
    skipped: tuple[str, ...] = ()


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


def bundle_pages(store: Store, prefix: str, job: str, loose: list[ObjectInfo], *, at: int = BUNDLE_AT) -> Bundled:
    """Bundle a job's loose pages (``loose``, listed under ``prefix``) when there are ``at`` or more.

    A page that does not pass the gate stays loose (readers name it); a
    bundle that does not read back whole deletes nothing.
    """
    if len(loose) < at:
        return Bundled(0, 0)
    loose = sorted(loose, key=lambda o: o.key)
    done = bundles = 0
    skipped: list[str] = []
    batch: list[tuple[str, bytes]] = []
    size = 0

    def flush() -> None:
        nonlocal done, bundles, batch, size
        if not batch:
            return
        key = bundle_key(prefix, batch[-1][0])
        data = encode_bundle(job, batch)
        store.put_bytes(key, data)
        held = parse_bundle(store.get_bytes(key), source=key, job=job)
        if set(held) != {name for name, _ in batch}:
            raise LedgerCorrupt(f"ledger bundle {key} did not read back whole; its pages stay loose")
        store.delete([f"{prefix}/{name}" for name, _ in batch])
        done, bundles, batch, size = done + len(batch), bundles + 1, [], 0

    for o in loose:
        name = o.key.rsplit("/", 1)[-1]
        if o.size > MAX_PAGE_BYTES or PAGE_NAME.match(name) is None:
            continue
        try:
            data = store.get_bytes(o.key)
        except StoreError:
            continue  # gone since the listing: another bundler took it
        try:
            page = parse_page(data, source=o.key)
            if page.job != job:
                raise LedgerCorrupt(f"{o.key}: a page of job {page.job}")
        except LedgerCorrupt as e:
            skipped.append(str(e))
            continue
        if len(batch) == BUNDLE_PAGES or size + len(data) * 2 + 64 > MAX_BUNDLE_BYTES:
            flush()
        batch.append((name, data))
        size += len(data) * 2 + 64  # a string inside JSON: quotes escaped, at most twice the bytes
    flush()
    return Bundled(done, bundles, tuple(skipped))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a ledger holds")
