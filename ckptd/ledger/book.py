"""A job's ledger in its store: pages written once under ``.ckptd/ledger/<job>/``, read back (no torch).

Keys sort by the time a page was written::

    .ckptd/ledger/<job>/<ms since 1970, 13 digits>-<source>-<writer id>-<seq>.json

Each writer (:class:`LedgerBook`) buffers its records and writes them from a
thread of its own, so no training step and no daemon lock waits on the
network; :class:`LedgerReader` reads every page once (pages never change) and
skips, with the reason, a page that fails the gate in ``record.py``. Pages
of a long job are gathered into bundles (``bundle.py``)::

    .ckptd/ledger/<job>/<ms of its newest page>-bundle-<id>.json
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import CkptdError, LedgerCorrupt
from ..store.base import ObjectInfo, Store
from .bundle import BUNDLE_AT, MAX_BUNDLE_BYTES, Bundled, bundle_pages, parse_bundle
from .record import MAX_PAGE_BYTES, MAX_RECORDS, Page, Record, check_job, job_name, parse_page

log = logging.getLogger("ckptd")

PREFIX = ".ckptd/ledger"
_KEY = re.compile(
    r"^\.ckptd/ledger/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/\d{13}-(hook|run|daemon)-[0-9a-f]{8}-\d{6}\.json$"
)
_BUNDLE = re.compile(r"^\.ckptd/ledger/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/\d{13}-bundle-[0-9a-f]{8}\.json$")
MAX_BUFFER = 16 * MAX_RECORDS
"""Records a writer holds while the store is unreachable; beyond it the oldest go (said once)."""
MAX_PAGES = 200_000
"""Pages a reader reads at most (the newest), so a flooded prefix cannot exhaust memory."""


def page_key(job: str, source: str, writer: str, seq: int, t: float) -> str:
    return f"{PREFIX}/{check_job(job)}/{int(t * 1000):013d}-{source}-{writer}-{seq:06d}.json"


class LedgerBook:
    """One writer's records of one job. Thread-safe; ``close()`` writes what is left and stops the thread.

    ``store`` is a Store, or a URI opened in the writing thread (so a slow S3
    endpoint delays no one). A write that fails keeps its records for the next.
    """

    def __init__(
        self, store: Store | str, *, job: str, source: str, flush_every: float = 10.0, min_gap: float = 1.0
    ) -> None:
        self.job, self.source = job_name(job), source
        self._store: Store | None = None if isinstance(store, str) else store
        self._owns_store = isinstance(store, str)
        self._uri = store if isinstance(store, str) else store.uri
        self.flush_every, self.min_gap = flush_every, min_gap
        self._writer = uuid.uuid4().hex[:8]
        self._seq = 0
        self._buffer: list[Record] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._warned = False
        self._dropped = 0
        self._last_write = 0.0
        self._thread = threading.Thread(target=self._loop, name="ckptd-ledger", daemon=True)
        self._thread.start()

    def append(self, record: Record) -> None:
        with self._lock:
            self._buffer.append(record)
            if len(self._buffer) > MAX_BUFFER:
                self._dropped += len(self._buffer) - MAX_BUFFER
                del self._buffer[: len(self._buffer) - MAX_BUFFER]

    def flush_soon(self) -> None:
        """Ask the thread to write now (at most once per ``min_gap`` seconds)."""
        self._wake.set()

    def flush(self) -> bool:
        """Write the buffered records now; True if nothing is left unwritten."""
        with self._write_lock:
            with self._lock:
                records, self._buffer = self._buffer, []
            if not records:
                return True
            written = 0
            try:
                store = self._open()
                for chunk in _pages(records):
                    key = page_key(self.job, self.source, self._writer, self._seq, time.time())
                    store.put_bytes(key, Page(self.job, self.source, chunk).to_json())
                    self._seq += 1
                    written += len(chunk)
                self._last_write = time.monotonic()
                return True
            except (CkptdError, OSError) as e:
                with self._lock:
                    self._buffer[:0] = records[written:]
                if not self._warned:
                    self._warned = True
                    log.warning("ckptd: cannot write the goodput ledger to %s (%s); will retry", self._uri, e)
                return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is left (the thread's last try) and stop; never waits more than ``timeout`` for a store
        that does not answer (a training job's close must not hang on its ledger)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            left = len(self._buffer)
        if self._thread.is_alive() or left:
            log.warning(
                "ckptd: the goodput ledger's last records may not have reached %s within %.0f s", self._uri, timeout
            )
        if self._dropped:
            log.warning(
                "ckptd: %d goodput ledger records were dropped while %s was unreachable", self._dropped, self._uri
            )
        if self._owns_store and self._store is not None and not self._thread.is_alive():
            self._store.close()

    def _open(self) -> Store:
        if self._store is None:
            from ..store import open_store

            self._store = open_store(self._uri)
        return self._store

    def _loop(self) -> None:
        try:
            self._open()  # now, so the last flush at close is one request, not a connection too
        except (CkptdError, OSError) as e:
            log.info("ckptd: the goodput ledger's store %s is not reachable yet: %s", self._uri, e)
        while True:
            self._wake.wait(self.flush_every)
            wait = self.min_gap - (time.monotonic() - self._last_write)
            if self._stop.is_set() or (wait > 0 and self._stop.wait(wait)):
                self.flush()  # the last try, for close()
                return
            self._wake.clear()
            self.flush()


def _pages(records: list[Record]) -> list[tuple[Record, ...]]:
    """Records cut into pages that stay under the size and count limits."""
    out: list[tuple[Record, ...]] = []
    page: list[Record] = []
    size = 200
    for r in records:
        n = len(json.dumps(r.to_dict())) + 1
        if page and (size + n > MAX_PAGE_BYTES or len(page) == MAX_RECORDS):
            out.append(tuple(page))
            page, size = [], 200
        page.append(r)
        size += n
    if page:
        out.append(tuple(page))
    return out


@dataclass
class Ledger:
    """What a read found: each job's records, oldest first, and the pages skipped (why)."""

    jobs: dict[str, list[Record]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def records(self, job: str | None = None) -> list[Record]:
        """One job's records, or every job's, by start time."""
        if job is not None:
            return list(self.jobs.get(job_name(job), []))
        return sorted((r for rs in self.jobs.values() for r in rs), key=_order)


def _name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _order(r: Record) -> tuple[float, float]:
    return (r.t0, r.t1)


class LedgerReader:
    """Reads a store's ledger; every page and bundle is fetched once and kept (they never change).

    Not thread-safe.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pages: dict[str, Page | str] = {}
        self._bundles: dict[str, dict[str, Page] | str] = {}
        self.loose: dict[str, list[ObjectInfo]] = {}
        """Each job's pages outside any bundle, as the last ``read`` listed them."""

    def read(self, job: str | None = None, *, newest: int | None = None, parallel: int = 8) -> Ledger:
        """The ledger of ``job`` (default: every job in the store), or its ``newest`` pages only."""
        prefix = PREFIX if job is None else f"{PREFIX}/{job_name(job)}"
        listed = self._list(prefix)
        loose = {o.key: o for o in listed if _KEY.match(o.key)}
        self.loose = {}
        for key, o in loose.items():
            self.loose.setdefault(key.split("/")[2], []).append(o)
        limit = MAX_PAGES if newest is None else min(newest, MAX_PAGES)
        bundles = self._needed(sorted(loose, key=_name), [o for o in listed if _BUNDLE.match(o.key)], limit)
        failed = self._fetch_all(
            [o for o in bundles if o.key not in self._bundles], self._fetch_bundle, self._bundles, parallel
        )
        problems: list[str] = []
        bundled: dict[str, Page] = {}  # a page's key -> the page, from the first bundle that holds it
        for o in bundles:
            held = self._bundles[o.key] if o.key in self._bundles else failed[o.key]
            if isinstance(held, str):
                problems.append(held)
                continue
            base = o.key.rsplit("/", 1)[0]
            for name, one in held.items():
                bundled.setdefault(f"{base}/{name}", one)
        keys = sorted(set(loose) | set(bundled), key=_name)[-limit:]
        todo = [loose[k] for k in keys if k in loose and k not in self._pages]
        transient = self._fetch_all(todo, self._fetch, self._pages, parallel)
        out = Ledger(problems=problems)
        for k in keys:
            page: Page | str = (self._pages.get(k) or transient[k]) if k in loose else bundled[k]  # loose wins
            if isinstance(page, str):
                out.problems.append(page)
                continue
            out.jobs.setdefault(page.job, []).extend(page.records)
        for records in out.jobs.values():
            records.sort(key=_order)
        return out

    def bundle(self, *, at: int = BUNDLE_AT) -> dict[str, Bundled]:
        """Bundle the loose pages the last ``read`` accepted, of each job with ``at`` or more loose pages.

        A page it refused stays loose (and named by every read).
        """
        out = {}
        for job, infos in self.loose.items():
            if len(infos) < at:
                continue
            pages = [(o.key.rsplit("/", 1)[-1], self._pages.get(o.key)) for o in infos]
            accepted = [(name, page) for name, page in pages if isinstance(page, Page)]
            out[job] = bundle_pages(self.store, f"{PREFIX}/{job}", job, accepted)
        return out

    def _needed(self, loose: list[str], bundles: list[ObjectInfo], limit: int) -> list[ObjectInfo]:
        """The bundles that can hold one of the ``limit`` newest pages, oldest first.

        A bundle's name carries the time of its newest page, so once ``limit``
        pages newer than a bundle are known, it and every older one are not read.
        """
        bundles = sorted(bundles, key=lambda o: _name(o.key), reverse=True)
        if limit >= MAX_PAGES:
            return bundles[::-1]
        known = list(loose)
        out: list[ObjectInfo] = []
        for o in bundles:
            if len(known) >= limit:
                known.sort(key=_name)
                if _name(o.key)[:13] < _name(known[-limit])[:13]:
                    break
            out.append(o)
            if o.key not in self._bundles:
                self._fetch_all([o], self._fetch_bundle, self._bundles, 1)
            held = self._bundles.get(o.key)
            if isinstance(held, dict):
                base = o.key.rsplit("/", 1)[0]
                known.extend(f"{base}/{name}" for name in held)
        return out[::-1]

    def _fetch_all(self, todo: list[ObjectInfo], fetch: Callable, cache: dict, parallel: int) -> dict[str, str]:
        """Fetch ``todo`` into ``cache``; what failed this time only (key -> why), which is not kept."""
        if len(todo) > 16 and parallel > 1:
            with ThreadPoolExecutor(parallel, thread_name_prefix="ckptd-ledger-read") as pool:
                fetched = list(pool.map(fetch, todo))
        else:
            fetched = [fetch(o) for o in todo]
        transient: dict[str, str] = {}
        for o, (value, keep) in zip(todo, fetched):
            if keep:
                cache[o.key] = value
            else:
                transient[o.key] = str(value)
        return transient

    def _list(self, prefix: str) -> list[ObjectInfo]:
        try:
            return self.store.list(prefix)
        except FileNotFoundError:
            return []

    def _fetch(self, o: ObjectInfo) -> tuple[Page | str, bool]:
        """The page at ``o`` or why it was skipped, and whether that answer holds for good."""
        match = _KEY.match(o.key)
        assert match is not None
        if o.size > MAX_PAGE_BYTES:
            return f"{o.key}: {o.size} bytes, over {MAX_PAGE_BYTES}: not a ledger page; skipped", True
        try:
            page = parse_page(self.store.get_bytes(o.key), source=o.key)
        except LedgerCorrupt as e:
            return str(e), True
        except (CkptdError, OSError) as e:
            return f"{o.key}: cannot read it ({e}); skipped this time", False
        if (page.job, page.source) != match.groups():
            return f"{o.key}: a page of job {page.job} by the {page.source} under another name; skipped", True
        return page, True

    def _fetch_bundle(self, o: ObjectInfo) -> tuple[dict[str, Page] | str, bool]:
        """The pages of the bundle at ``o`` or why it was skipped, and whether that answer holds for good."""
        match = _BUNDLE.match(o.key)
        assert match is not None
        if o.size > MAX_BUNDLE_BYTES:
            return f"{o.key}: {o.size} bytes, over {MAX_BUNDLE_BYTES}: not a ledger bundle; skipped", True
        try:
            return parse_bundle(self.store.get_bytes(o.key), source=o.key, job=match.group(1)), True
        except LedgerCorrupt as e:
            return str(e), True
        except (CkptdError, OSError) as e:
            return f"{o.key}: cannot read it ({e}); skipped this time", False


def read_ledger(store: Store, job: str | None = None) -> Ledger:
    """Every page of ``job`` (default: every job) in ``store``."""
    return LedgerReader(store).read(job)


RecordSink = Callable[[Record], None]
"""Where a recorder sends its records (a LedgerBook's ``append``)."""
