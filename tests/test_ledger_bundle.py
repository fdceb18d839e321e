"""Bundles of ledger pages: a long job's ledger in a few objects, every record still read exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from ckptd.ledger.book import LedgerReader, page_key
from ckptd.ledger.bundle import BUNDLE_PAGES, encode_bundle
from ckptd.ledger.record import Page, Record
from ckptd.store import open_store
from ckptd.store.file import FileStore

T = 1.8e9
JOB = "job-1"
PREFIX = f".ckptd/ledger/{JOB}"


def write_pages(store, n: int, *, job: str = JOB, t: float = T) -> list[str]:
    """``n`` loose pages as a hook would leave them: a start, then a train span per page, 10 s each."""
    keys = []
    for i in range(n):
        records = [Record(kind="start", pid=7, t0=t - 3, t1=t, gpus=2)] if i == 0 else []
        records.append(
            Record(kind="train", pid=7, t0=t + 10 * i, t1=t + 10 * (i + 1), step0=10 * i, step1=10 * i + 9, steps=10)
        )
        key = page_key(job, "hook", "0123abcd", i, t + 10 * (i + 1))
        store.put_bytes(key, Page(job, "hook", tuple(records)).to_json())
        keys.append(key)
    return keys


def loose_keys(store) -> list[str]:
    return sorted(o.key for o in store.list(PREFIX) if "-bundle-" not in o.key)


def bundles(store) -> list[str]:
    return sorted(o.key for o in store.list(PREFIX) if "-bundle-" in o.key)


def read(store):
    ledger = LedgerReader(store).read(JOB)
    return ledger.records(JOB), ledger.problems


def test_bundling_keeps_every_record_once_and_removes_the_loose_pages(tmp_path):
    store = FileStore(str(tmp_path))
    write_pages(store, 40)
    before, problems = read(store)
    assert len(before) == 41 and not problems
    kept = LedgerReader(store)  # a long-lived reader (the daemon's) that has every page cached
    kept.read(JOB)
    reader = LedgerReader(store)
    reader.read(JOB)
    done = reader.bundle(at=10)
    assert done[JOB].pages == 40 and done[JOB].bundles == 1
    assert loose_keys(store) == [] and len(bundles(store)) == 1
    assert read(store) == (before, [])
    assert kept.read(JOB).records(JOB) == before, "a reader that cached the loose pages reads the same after"
    assert kept.read(JOB, newest=5).records(JOB) == before[-5:], "newest counts pages, bundled or not"
    write_pages(store, 3, t=T + 1000)  # pages written after the bundle stay loose and are read beside it
    assert len(read(store)[0]) == 41 + 4


def test_below_the_threshold_nothing_is_bundled(tmp_path):
    store = FileStore(str(tmp_path))
    write_pages(store, 9)
    reader = LedgerReader(store)
    reader.read(JOB)
    assert reader.bundle(at=10) == {}
    assert len(loose_keys(store)) == 9


def test_a_crash_before_the_delete_and_a_second_bundler_count_nothing_twice(tmp_path):
    store = FileStore(str(tmp_path))
    keys = write_pages(store, 12)
    before, _ = read(store)
    pages = [(k.rsplit("/", 1)[-1], store.get_bytes(k)) for k in keys]
    for i, tag in enumerate(("aaaaaaaa", "bbbbbbbb")):  # two bundlers, both died before deleting
        store.put_bytes(f"{PREFIX}/{1800000000000 + i:013d}-bundle-{tag}.json", encode_bundle(JOB, pages[i:]))
    assert read(store) == (before, []), "the loose pages win; the bundles' copies are not counted again"
    store.delete(keys[:6])  # then one bundler's delete got half way
    assert read(store) == (before, [])
    store.delete(keys)
    assert read(store) == (before, [])


def test_two_bundlers_at_once_lose_nothing_and_count_nothing_twice(tmp_path):
    store = FileStore(str(tmp_path))
    write_pages(store, 300)
    before, _ = read(store)
    errors: list[BaseException] = []

    def bundler():
        try:
            reader = LedgerReader(FileStore(str(tmp_path)))
            reader.read(JOB)
            reader.bundle(at=10)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=bundler) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert loose_keys(store) == []
    assert read(store) == (before, [])


def test_a_bundle_larger_than_its_page_limit_is_split(tmp_path, monkeypatch):
    monkeypatch.setattr("ckptd.ledger.bundle.BUNDLE_PAGES", 16)
    store = FileStore(str(tmp_path))
    write_pages(store, 40)
    before, _ = read(store)
    reader = LedgerReader(store)
    reader.read(JOB)
    assert reader.bundle(at=10)[JOB].bundles == 3
    assert read(store) == (before, [])


def _backwards(data: bytes) -> bytes:
    raw = json.loads(data)
    raw["records"][0]["t1"] = raw["records"][0]["t0"] - 1
    return json.dumps(raw).encode()


HOSTILE_BUNDLES = {
    "not JSON": lambda good: b"{",
    "another format": lambda good: json.dumps({"format": "ckptd-ledger-bundle/9", "job": JOB, "pages": []}).encode(),
    "another job": lambda good: encode_bundle("job-2", [good]),
    "a page of another job": lambda good: encode_bundle(JOB, [(good[0], good[1].replace(b'"job-1"', b'"job-2"'))]),
    "a page under a hostile name": lambda good: encode_bundle(JOB, [("../../x-hook-0123abcd-000000.json", good[1])]),
    "a page that fails the gate": lambda good: encode_bundle(JOB, [(good[0], _backwards(good[1]))]),
    "NaN": lambda good: encode_bundle(JOB, [good]).replace(b'"pages":', b'"x":NaN,"pages":'),
    "too many pages": lambda good: encode_bundle(JOB, [good] * (BUNDLE_PAGES + 1)),
    "a page name that is a number": lambda good: json.dumps(
        {"format": "ckptd-ledger-bundle/1", "job": JOB, "pages": [[1, 2]]}
    ).encode(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BUNDLES))
def test_a_hostile_bundle_is_skipped_whole_with_its_reason(tmp_path, name):
    store = FileStore(str(tmp_path))
    keys = write_pages(store, 3)
    before, _ = read(store)
    store.delete(keys[2:])  # its page is gone, and only the hostile bundle claims to hold it
    good = (keys[2].rsplit("/", 1)[-1], Page(JOB, "hook", (before[-1],)).to_json())
    store.put_bytes(f"{PREFIX}/1800000000000-bundle-0badf00d.json", HOSTILE_BUNDLES[name](good))
    records, problems = read(store)
    assert records == before[:-1], "nothing of a bad bundle is trusted"
    assert len(problems) == 1 and "0badf00d" in problems[0], problems


def test_a_bundle_cannot_replace_a_loose_page_or_add_pages_of_another_job(tmp_path):
    store = FileStore(str(tmp_path))
    keys = write_pages(store, 3)
    before, _ = read(store)
    forged = Page(JOB, "hook", (Record(kind="train", pid=7, t0=T, t1=T + 5000, step0=0, step1=1, steps=2),)).to_json()
    store.put_bytes(
        f"{PREFIX}/1800000000000-bundle-0badf00d.json", encode_bundle(JOB, [(keys[0].rsplit("/", 1)[-1], forged)])
    )
    assert read(store) == (before, []), "the loose page is what counts"


def test_a_page_the_reader_refuses_stays_loose_and_is_still_named(tmp_path):
    store = FileStore(str(tmp_path))
    write_pages(store, 12)
    bad = page_key(JOB, "hook", "deadbeef", 0, T + 5)
    store.put_bytes(bad, b'{"format": "ckptd-ledger/1"}')
    misnamed = page_key(JOB, "daemon", "deadbeef", 1, T + 6)  # a valid hook page under a daemon's name
    store.put_bytes(misnamed, store.get_bytes(page_key(JOB, "hook", "0123abcd", 1, T + 20)))
    reader = LedgerReader(store)
    reader.read(JOB)
    done = reader.bundle(at=10)[JOB]
    assert done.pages == 12 and done.bundles == 1
    assert loose_keys(store) == sorted([bad, misnamed])
    records, problems = read(store)
    assert len(records) == 13 and len(problems) == 2 and all("deadbeef" in p for p in problems), problems


def test_ckptd_goodput_bundles_a_long_ledger_on_s3_and_reads_the_same(bucket):
    uri = f"s3://{bucket}/run"
    store = open_store(uri)
    write_pages(store, 520)  # over the 512 loose pages that make it bundle
    store.put_bytes(
        page_key(JOB, "run", "0123abcd", 0, T + 6000),
        Page(
            JOB,
            "run",
            (Record(kind="run", pid=1, t0=T - 5, t1=T - 5), Record(kind="run_end", pid=1, t0=T + 5300, t1=T + 5300)),
        ).to_json(),
    )

    def goodput(*args):
        out = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "goodput", uri, "--json", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout), out.stderr

    untouched, said = goodput("--no-bundle")
    assert "bundled" not in said and len(loose_keys(store)) == 521
    first, said = goodput()
    assert "bundled 521 ledger pages of job job-1 into 1 object(s)" in said, said
    assert loose_keys(store) == [] and len(bundles(store)) == 1
    second, said = goodput()
    assert "bundled" not in said
    assert first == second == untouched
    store.close()


def test_the_daemons_refresh_bundles_a_long_ledger_and_keeps_its_figures(tmp_path):
    from ckptd.ledger.watch import LedgerWatch

    root = str(tmp_path / "s")
    store = FileStore(root)
    write_pages(store, 520)
    watch = LedgerWatch(every=3600.0)
    try:
        watch.expect(root, JOB)
        watch.refresh()
        first = watch.figures()[JOB]
        assert loose_keys(store) == [] and len(bundles(store)) == 1
        watch.refresh()
        assert watch.figures()[JOB] == first
    finally:
        watch.close()


def test_newest_pages_read_only_the_bundles_that_hold_them(tmp_path, monkeypatch):
    monkeypatch.setattr("ckptd.ledger.bundle.BUNDLE_PAGES", 16)
    store = FileStore(str(tmp_path))
    write_pages(store, 40)  # one page (a train span) each; bundled into 16 + 16 + 8
    reader = LedgerReader(store)
    reader.read(JOB)
    reader.bundle(at=10)
    write_pages(store, 3, t=T + 1000)
    everything, _ = read(store)
    spans = [r for r in everything if r.kind == "train"]
    for newest, bundles_read in ((3, 0), (5, 1), (11, 1), (12, 2), (40, 3), (43, 3)):
        reader = LedgerReader(store)
        got = [r for r in reader.read(JOB, newest=newest).records(JOB) if r.kind == "train"]
        assert got == spans[-newest:], newest
        assert len(reader._bundles) == bundles_read, (newest, sorted(reader._bundles))
