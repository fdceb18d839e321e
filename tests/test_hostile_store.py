"""A store's files are hostile: a FIFO, a symlink, a directory, absurd sizes, a garbage manifest.

Each costs one clear error for that snapshot and a fall back to the next older
one, never a hang, a traceback, or a copy printed as "(verified)".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_snapshot import run

STEP3 = "step-000000000003"
DAMAGES = [
    "data fifo",
    "data symlink loop",
    "data directory",
    "data symlink to a good copy",
    "absurd shape",
    "item length 1e15",
    "garbage manifest",
    "manifest fifo",
    "manifest directory",
    "absurd file size",
]


def _rewrite_manifest(path: str, change) -> None:
    with open(path) as f:
        raw = json.load(f)
    raw.pop("digest")
    change(raw)
    canon = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    raw["digest"] = hashlib.sha256(canon.encode()).hexdigest()  # a hostile writer recomputes the digest
    with open(path, "w") as f:
        json.dump(raw, f)


def damage(store: str, how: str, outside: str) -> None:
    snap = os.path.join(store, STEP3)
    manifest = os.path.join(snap, "ckptd.json")
    data = os.path.join(snap, "__0_0.distcp")
    if how.startswith("data"):
        shutil.copy(data, os.path.join(outside, "copy.distcp"))
        os.unlink(data)
        if how == "data fifo":
            os.mkfifo(data)
        elif how == "data symlink loop":
            os.symlink(data, data)
        elif how == "data directory":
            os.mkdir(data)
        else:
            os.symlink(os.path.join(outside, "copy.distcp"), data)
    elif how == "absurd shape":

        def change(raw):
            item = next(i for i in raw["items"] if i["kind"] == "tensor")
            item["shape"] = item["chunk_sizes"] = [10**7, 10**7]
            item["chunk_offsets"] = [0, 0]
            item["nbytes"] = 4 * 10**14

        _rewrite_manifest(manifest, change)
    elif how == "item length 1e15":
        _rewrite_manifest(
            manifest, lambda raw: next(i for i in raw["items"] if i["kind"] == "tensor").update(length=10**15)
        )
    elif how == "absurd file size":
        _rewrite_manifest(manifest, lambda raw: raw["files"][0].update(size=10**15))
    elif how == "garbage manifest":
        with open(manifest, "wb") as f:
            f.write(b"\x00{garbage")
    else:
        os.unlink(manifest)
        os.mkfifo(manifest) if how == "manifest fifo" else os.mkdir(manifest)


@pytest.fixture
def hostile(tmp_path, request):
    store = str(tmp_path / "store")
    run(store, 4)  # steps 1 and 3
    outside = tmp_path / "outside"
    outside.mkdir()
    damage(store, request.param, str(outside))
    return store


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptd.cli", *args], capture_output=True, text=True, timeout=60)


RESTORE = """
import sys, warnings, ckptd
sys.path.insert(0, {tests!r})
from test_snapshot import make, ckpt_for
model, opt, sched, counter = make(5)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with ckpt_for({store!r}, model, opt, sched, counter) as ck:
        start = ck.restore()
    loaded = ckptd.load({store!r})["meta"]["step"]
print(start, loaded, "|".join(str(w.message) for w in seen))
"""


@pytest.mark.parametrize("hostile", DAMAGES, indirect=True)
def test_the_python_restore_falls_back_to_the_older_snapshot(hostile):
    code = RESTORE.format(tests=os.path.dirname(__file__), store=hostile)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    start, loaded, warned = res.stdout.strip().split(" ", 2)
    assert (start, loaded) == ("2", "1"), res.stdout
    assert STEP3 in warned, "the skipped snapshot is named"
    assert STEP3 not in res.stderr, "said once, as a warning, not again by logging's last resort: " + res.stderr


@pytest.mark.parametrize("hostile", DAMAGES, indirect=True)
def test_verify_calls_it_corrupt_and_exits_1(hostile):
    res = cli("verify", hostile, "--all")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    line = next(line for line in res.stdout.splitlines() if "step 3" in line)
    assert "CORRUPT" in line, res.stdout
    assert "step 1: ok" in res.stdout


@pytest.mark.parametrize("hostile", DAMAGES, indirect=True)
def test_cli_restore_refuses_it_and_falls_back_when_no_step_is_named(hostile, tmp_path):
    named = cli("restore", hostile, "--step", "3", "--to", str(tmp_path / "named"))
    assert named.returncode != 0 and "Traceback" not in named.stderr, named.stdout + named.stderr
    assert "(verified)" not in named.stdout and "step-000000000003" in named.stderr, named.stderr
    assert not (tmp_path / "named" / STEP3).exists()
    newest = cli("restore", hostile, "--to", str(tmp_path / "newest"))
    assert newest.returncode == 0, newest.stderr
    assert "restored step 1" in newest.stdout and newest.stderr.count("skipping step-000000000003") == 1, (
        newest.stderr  # said once: a warning, not a warning and its log line
    )


def test_a_snapshot_that_verifies_but_cannot_be_read_is_skipped_too(tmp_path):
    """A manifest that puts a tensor's data outside its record (digest recomputed) passes the checksums; reading
    finds it, and every restore path falls back."""
    store = str(tmp_path / "store")
    run(store, 4)

    def change(raw):
        item = next(i for i in raw["items"] if i["kind"] == "tensor" and i.get("data_offset", -1) >= 0)
        item["data_offset"] = item["offset"] + item["length"]

    _rewrite_manifest(os.path.join(store, STEP3, "ckptd.json"), change)
    assert "step 3: ok" in cli("verify", store, "--all").stdout, "the checksums still pass"
    code = RESTORE.format(tests=os.path.dirname(__file__), store=store)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    start, loaded, warned = res.stdout.strip().split(" ", 2)
    assert (start, loaded) == ("2", "1") and f"skipping {STEP3}" in warned and "outside its record" in warned, (
        res.stdout
    )


def _torchsnapshot(path: str) -> dict:
    import torchsnapshot

    model = torch.nn.Linear(30, 30)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 30)).sum().backward()
    opt.step()
    torchsnapshot.Snapshot.take(path, app_state={"model": model, "optim": opt})
    with open(os.path.join(path, ".snapshot_metadata")) as f:
        text = f.read()
    return json.loads(text) if text.lstrip().startswith("{") else __import__("yaml").safe_load(text)


def _weight(meta: dict) -> dict:
    return meta["manifest"]["0/model/weight"]


TORCHSNAPSHOT_DAMAGE = {
    "absurd shape": (lambda m, d: _weight(m).update(shape=[10**8, 10**8]), "more than any snapshot holds"),
    "byte range past the file": (
        lambda m, d: _weight(m).update(byte_range=[10**6, 10**6 + 3600]),
        "holds .* bytes, the manifest reads up to",
    ),
    "range shorter than the shape": (lambda m, d: _weight(m).update(byte_range=[0, 8]), "shape needs 3600"),
    "location outside the snapshot": (lambda m, d: _weight(m).update(location="../../etc/passwd"), r"\.\."),
    "unknown dtype": (lambda m, d: _weight(m).update(dtype="torch.float128"), "float128"),
    "a container naming no entry": (lambda m, d: m["manifest"]["0/model"]["keys"].append("ghost"), "ghost"),
    "a FIFO for the data file": (
        lambda m, d: [os.remove(p) or os.mkfifo(p) for p in [os.path.join(d, _weight(m)["location"])]],
        "a FIFO, not a regular file",
    ),
    "not a manifest": (lambda m, d: m.update(manifest=[1, 2]), "not a torchsnapshot manifest"),
    "nested 5,000 deep": (lambda m, d: _nest(m, 5000), "nested more than"),
}


def _nest(meta: dict, depth: int) -> None:
    key = "0/model"
    for _ in range(depth):
        meta["manifest"][key] = {"type": "dict", "keys": ["x"]}
        key += "/x"
    meta["manifest"][key] = {"type": "int", "serialized_value": "1"}


@pytest.mark.parametrize("damage", list(TORCHSNAPSHOT_DAMAGE))
def test_a_hostile_torchsnapshot_is_refused_in_one_line(tmp_path, damage):
    """inspect, export and convert of a damaged torchsnapshot: exit 1 with one line naming it, never a
    traceback, a hang, a huge allocation or a file outside the snapshot."""
    src = str(tmp_path / "ts")
    meta = _torchsnapshot(src)
    change, says = TORCHSNAPSHOT_DAMAGE[damage]
    change(meta, src)
    with open(os.path.join(src, ".snapshot_metadata"), "w") as f:
        json.dump(meta, f)
    runs = {
        "export": ["export", src, "-o", str(tmp_path / "out.pt")],
        "convert": ["convert", src, str(tmp_path / "converted")],
    }
    if damage in ("absurd shape", "unknown dtype", "not a manifest", "a container naming no entry"):
        runs["inspect"] = ["inspect", src]
    for name, args in runs.items():
        res = subprocess.run([sys.executable, "-m", "ckptd.cli", *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, (name, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, (name, res.stderr)
        assert re.search(says, res.stderr), (name, res.stderr)
    assert not os.path.exists(tmp_path / "out.pt") and not os.path.exists(tmp_path / "converted" / "step-000000000000")
