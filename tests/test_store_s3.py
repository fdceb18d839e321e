"""S3Store against a real SeaweedFS server: transfers, checksums, commit races, errors, outages."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from ckptd.errors import SnapshotExists, StoreError, StoreUnreachable
from ckptd.store import open_store
from ckptd.store.s3 import S3Config, S3Store

SMALL = S3Config(part_size=5 << 20, concurrency=4)


def test_round_trip_multipart_and_ranged(bucket, tmp_path):
    store = S3Store(bucket, "run", config=SMALL)
    src = tmp_path / "big.bin"
    data = os.urandom(12 << 20)  # three parts
    src.write_bytes(data)
    seen = []
    store.put_file("step-000000000001/__0_0.distcp", str(src), progress=seen.append)
    assert sum(seen) == len(data)
    dest = tmp_path / "back.bin"
    store.get_file("step-000000000001/__0_0.distcp", str(dest))
    assert dest.read_bytes() == data
    assert store.get_range("step-000000000001/__0_0.distcp", 5 << 20, 100) == data[5 << 20 : (5 << 20) + 100]
    store.put_bytes("step-000000000001/x", b"hello")
    assert store.get_bytes("step-000000000001/x") == b"hello"
    assert store.children("") == ["step-000000000001"]
    assert [o.key for o in store.list("step-000000000001")] == ["step-000000000001/__0_0.distcp", "step-000000000001/x"]
    store.delete_prefix("step-000000000001")
    assert store.list("") == [] and not store.exists("step-000000000001/x")
    store.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_upload_bodies_are_sent_as_bytes_up_to_the_limit(bucket, tmp_path, monkeypatch, streamed):
    """Parts and small files go to botocore as bytes (one read; see _bodies_as_bytes); a part above the
    limit is streamed from the file. Either way the object, its CRC32C and the progress are right."""
    import ckptd.store.s3 as s3

    if streamed:
        monkeypatch.setattr(s3, "_BYTES_BODY_MAX", 1 << 20)
    store = S3Store(bucket, "run", config=SMALL)
    sent = []
    store._client.meta.events.register(
        "before-send.s3",
        lambda request, **kw: sent.append(type(request.body).__name__) if request.method == "PUT" else None,
    )
    big, small = tmp_path / "big", tmp_path / "small"
    data = os.urandom((11 << 20) + 3)  # two full parts and a short one
    big.write_bytes(data)
    small.write_bytes(data[:1000])
    seen = []
    store.put_file("s/big", str(big), progress=seen.append)
    store.put_file("s/small", str(small), progress=seen.append)
    assert sum(seen) == len(data) + 1000
    assert set(sent) == ({"ReadFileChunk", "bytes"} if streamed else {"bytes"}), sent
    back = tmp_path / "back"
    store.get_file("s/big", str(back))
    assert back.read_bytes() == data
    head = store._client.head_object(Bucket=bucket, Key="run/s/small", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"]
    store.close()


def test_an_empty_file_does_not_poison_the_next_upload(bucket, tmp_path, caplog):
    """An empty upload gets its final reply where botocore awaits "100 Continue"; the next request on that
    pooled connection must still read its own reply, not stall until the read timeout."""
    store = S3Store(bucket, "run", config=S3Config(read_timeout=10, max_attempts=1))
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.write_bytes(b"")
    full.write_bytes(os.urandom(2 << 20))
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    for i in range(3):
        store.put_file(f"s/{i}/empty", str(empty))
        store.put_file(f"s/{i}/full", str(full))
    assert time.monotonic() - t0 < 10, "an upload waited out the read timeout"
    assert not [r for r in caplog.records if "Failed to parse headers" in r.getMessage()]
    assert [o.size for o in store.list("s/2")] == [0, 2 << 20]
    store.close()


def test_listing_pages_and_batch_delete(bucket):
    store = S3Store(bucket, "many")
    keys = [f"d/k{i:04d}" for i in range(1100)]
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"."), keys))
    assert [o.key for o in store.list("d")] == keys
    store.delete(keys)
    assert store.list("d") == []


def test_exactly_one_of_eight_racing_commits_wins(bucket):
    store = S3Store(bucket, "race")
    results = []
    barrier = threading.Barrier(8)

    def commit(i):
        barrier.wait()
        try:
            store.commit("step-000000000007/ckptd.json", f"writer {i}".encode())
            results.append(("won", i))
        except SnapshotExists:
            results.append(("lost", i))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [i for r, i in results if r == "won"]
    assert len(winners) == 1 and len(results) == 8
    assert store.get_bytes("step-000000000007/ckptd.json") == f"writer {winners[0]}".encode()


def test_missing_bucket_is_one_line_naming_it(s3env):
    with pytest.raises(StoreUnreachable, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"):
        open_store("s3://no-such-bucket/run")


def test_bad_credentials_and_bad_endpoint_fail_at_construction(s3env, monkeypatch, caplog):
    bucket = s3env.make_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-do-not-print")
    caplog.set_level(logging.DEBUG, logger="ckptd")
    with pytest.raises(StoreUnreachable, match="denied") as denied:
        open_store(f"s3://{bucket}/run")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StoreUnreachable, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9") as unreachable:
        S3Store(bucket, "run", config=S3Config(max_attempts=1, connect_timeout=1))
    text = "\n".join([str(denied.value), str(unreachable.value), caplog.text])
    for secret in ("wrong-secret-do-not-print", "session-token-do-not-print", "ckptd-test-secret"):
        assert secret not in text
    assert "\n" not in str(denied.value) and "\n" not in str(unreachable.value)


@pytest.mark.parametrize("after_parts", [1, 3])
def test_server_killed_mid_upload_then_restarted(s3env, tmp_path, after_parts):
    bucket = s3env.make_bucket()
    store = S3Store(
        bucket,
        "outage",
        config=S3Config(part_size=5 << 20, concurrency=2, max_attempts=1, connect_timeout=1, read_timeout=5),
    )
    store.put_bytes("kept", b"committed before the outage")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(40 << 20))
    killed = []

    parts = []

    def kill_after_first_part(nbytes):  # the outage lands mid-upload, whatever the machine's speed
        parts.append(nbytes)
        if len(parts) == after_parts and not killed:
            killed.append(nbytes)
            s3env.kill()

    with pytest.raises(StoreError):
        store.put_file("big", str(src), progress=kill_after_first_part)
    assert killed
    store.close()
    s3env.start()
    store = S3Store(bucket, "outage", config=S3Config(part_size=5 << 20))  # default retries, as a user runs
    assert store.get_bytes("kept") == b"committed before the outage"
    store.put_file("big", str(src))
    assert store.get_range("big", 123, 10) == src.read_bytes()[123:133]
    assert store.abort_stale_uploads(0) >= 1, "the upload the outage cut off was left behind"
    store.close()


def test_stale_multipart_uploads_are_aborted(bucket):
    store = S3Store(bucket, "gc")
    client = store._client
    client.create_multipart_upload(Bucket=bucket, Key="gc/step-000000000001/__0_0.distcp")
    assert store.abort_stale_uploads(3600) == 0
    assert store.abort_stale_uploads(0) == 1
    assert client.list_multipart_uploads(Bucket=bucket, Prefix="gc/").get("Uploads", []) == []


def test_boto_debug_logs_are_redacted(bucket, monkeypatch, caplog):
    """Even with DEBUG on for everything, no session token or signature reaches the log."""
    import logging

    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-that-must-not-leak")
    caplog.set_level(logging.DEBUG)
    try:
        S3Store(bucket, "x")
    except StoreUnreachable:
        pass  # the server may refuse an unknown token; the log is what matters
    assert "X-Amz-Security-Token" in caplog.text, "botocore logged the request headers"
    assert "token-that-must-not-leak" not in caplog.text
    assert "Signature=<redacted>" in caplog.text or "Signature=" not in caplog.text


def test_an_endpoint_that_is_not_s3_is_named_as_such(tmp_path):
    """A proxy or web server answering 404 to everything is not "a missing bucket"."""
    import http.server
    import socketserver

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), NotFound) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{httpd.server_address[1]}",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        res = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "ls", "s3://b/run"], env=env, capture_output=True, text=True, timeout=60
        )
        httpd.shutdown()
    assert res.returncode == 1
    assert "no S3 headers" in res.stderr and "AWS_ENDPOINT_URL" in res.stderr and "does not exist" not in res.stderr
    assert "Traceback" not in res.stderr


def test_an_unreachable_endpoint_fails_within_seconds_naming_it():
    """Tried as a new user would: the default configuration, through the CLI."""
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "ls", "s3://b/run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1 and "cannot reach the S3 endpoint http://127.0.0.1:9" in res.stderr
    assert time.monotonic() - t0 < 8, "an unreachable endpoint must fail fast, not after retries and backoff"
