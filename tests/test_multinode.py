"""Snapshots of many ranks on many nodes: whole in the object store or not committed; one writer per store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_daemon import DaemonProc
from test_distributed import WORKER, launch
from test_snapshot import make, run, train_step

import ckptd
from ckptd.errors import LeaseLost, SnapshotError, StoreInUse
from ckptd.persist.commit import pruned_key, try_commit, upload_part
from ckptd.persist.lease import Lease
from ckptd.persist.retention import Retention, apply, delete_snapshot, plan
from ckptd.restore.find import read_manifest
from ckptd.snapshot.manifest import manifest_key
from ckptd.snapshot.parts import part_key
from ckptd.store import open_store
from ckptd.store.file import FileStore
from ckptd.store.s3 import S3Store


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptd.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("nodes", [2, 3])
def test_nodes_with_their_own_daemons_commit_every_rank(s3env, tmp_path, nodes):
    """A daemon and a local tier per node, one S3 prefix: every commit is whole; fresh nodes resume from S3."""
    uri = f"s3://{s3env.make_bucket()}/two-nodes"
    daemons = [DaemonProc(extra_env=s3env.env()) for _ in range(nodes)]
    try:
        envs = [
            {
                **s3env.env(),
                "CKPTD_SOCKET": d.socket,
                "CKPTD_LOCAL": str(tmp_path / f"node-{i}"),
                "CKPTD_JOB": "two-nodes",
            }
            for i, d in enumerate(daemons)
        ]
        finals = launch(tmp_path, uri, nodes, "save", "save", envs)
    finally:
        for d in daemons:
            d.stop()
    out = "\n".join(d.output() for d in daemons)
    infos = [i for i in ckptd.list_snapshots(uri) if i.committed]
    assert [(i.step, i.world_size) for i in infos] == [(2, nodes), (5, nodes)], out
    res = cli("verify", uri, "--all", env=s3env.env())
    assert res.returncode == 0 and "step 2: ok" in res.stdout and "step 5: ok" in res.stdout, res.stdout + res.stderr
    fresh = [
        {
            **s3env.env(),
            "CKPTD_LOCAL": str(tmp_path / f"fresh-{i}"),
            "CKPTD_SOCKET": str(tmp_path / "none"),
            "CKPTD_JOB": "two-nodes-again",
        }
        for i in range(nodes)
    ]
    for got in launch(tmp_path, uri, nodes, "restore", "restore", fresh):
        assert got["start"] == 6
        assert torch.equal(got["model"]["0.weight"], finals[0]["model"]["0.weight"])


@pytest.fixture
def one_part(bucket, tmp_path):
    """A local snapshot of step 3 and its manifest, with rank 0's part uploaded to S3."""
    run(tmp_path / "local", 4)
    local = FileStore(str(tmp_path / "local"))
    data = local.get_bytes(manifest_key(3))
    manifest = read_manifest(local, 3, data=data)
    remote = S3Store(bucket, "parts")
    upload_part(remote, str(tmp_path / "local" / "step-000000000003"), manifest, data, 0)
    return remote, manifest, data


def test_a_whole_part_commits(one_part):
    remote, manifest, data = one_part
    assert try_commit(remote, manifest, data) == []
    assert remote.get_bytes(manifest_key(3)) == data
    assert try_commit(remote, manifest, data) == [], "a peer finding it committed is success"


@pytest.mark.parametrize(
    "damage",
    [
        "object missing",
        "object short",
        "record lies",
        "record garbage",
        "record huge",
        "record absent",
        "record of another world",
        "record of another attempt",
    ],
)
def test_a_part_that_is_not_whole_never_commits(one_part, damage):
    remote, manifest, data = one_part
    name = manifest.files_of(0)[0].name
    record = part_key(3, manifest.attempt, 0)
    if damage == "object missing":
        remote.delete([manifest.object_key(name)])
    elif damage == "object short":
        remote.put_bytes(manifest.object_key(name), b"short")
    elif damage == "record lies":
        raw = json.loads(remote.get_bytes(record))
        raw["files"][0]["size"] += 1
        remote.put_bytes(record, json.dumps(raw).encode())
    elif damage in ("record of another world", "record of another attempt"):
        raw = json.loads(remote.get_bytes(record))
        raw.update({"world_size": 2} if damage == "record of another world" else {"attempt": "0123abcd"})
        remote.put_bytes(record, json.dumps(raw).encode())
    elif damage == "record garbage":
        remote.put_bytes(record, b"\x00{not json")
    elif damage == "record huge":
        remote.put_bytes(record, b" " * (80 << 20))
    else:
        remote.delete([record])
    problems = try_commit(remote, manifest, data)
    assert len(problems) == 1 and ("rank 0" in problems[0]), problems
    assert not remote.exists(manifest_key(3)), "nothing commits a snapshot that is not whole"
    assert 3 not in [i.step for i in ckptd.list_snapshots(remote.uri) if i.committed]


def test_a_second_job_is_refused_in_one_line_and_take_over_fences_the_first(tmp_path):
    store = str(tmp_path / "store")
    model, opt, sched, counter = make()
    first = Lease(FileStore(store), job="first").acquire()
    with pytest.raises(StoreInUse, match=r"in use by job first .*take_over=True") as e:
        ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1")
    assert "\n" not in str(e.value)
    ck = ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1", take_over=True)
    with pytest.raises(LeaseLost):
        first.check()
    first.release()
    train_step(model, opt, sched, counter)
    ck.step(0)
    ck.close()
    assert [i.step for i in ckptd.list_snapshots(store) if i.committed] == [0]


def test_a_taken_over_job_commits_nothing_more(tmp_path):
    store = str(tmp_path / "store")
    model, opt, sched, counter = make()
    ck = ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1")
    train_step(model, opt, sched, counter)
    ck.step(0)
    ck.wait()
    thief = Lease(FileStore(store), job="thief", take_over=True).acquire()
    try:
        train_step(model, opt, sched, counter)
        ck.step(1)
        with pytest.raises(SnapshotError, match="step 1 failed: the lease .* taken over by job thief"):
            ck.wait()
    finally:
        ck.close(timeout=10) if not ck._closed else None
        thief.release()
    assert [i.step for i in ckptd.list_snapshots(store) if i.committed] == [0]


def test_failed_restore_to_leaves_no_directory(s3env, tmp_path):
    uri = f"s3://{s3env.make_bucket()}/gone"
    run(uri, 4, local=str(tmp_path / "tier"))
    remote = open_store(uri)
    manifest = read_manifest(remote, 3)
    remote.put_bytes(manifest.object_key(manifest.files_of(0)[0].name), b"damaged")
    res = cli("restore", uri, "--step", "3", "--to", str(tmp_path / "back"), env=s3env.env())
    assert res.returncode != 0 and "step-000000000003 does not verify" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "back").exists() or not os.listdir(tmp_path / "back")


@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_under_ckptd_run_commits_every_rank_to_s3(s3env, tmp_path, nproc):
    """`ckptd run --store s3://… -- torchrun --nproc-per-node 2 train.py`, tried as a new user would."""
    uri = f"s3://{s3env.make_bucket()}/torchrun"
    env = {**s3env.env(), "CKPTD_LOCAL": str(tmp_path / "node")}

    def ckptd_run(mode: str, tag: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "ckptd.cli",
            "run",
            "--store",
            uri,
            "--max-restarts",
            "0",
            "--socket",
            str(tmp_path / f"{tag}.sock"),
            "--",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            WORKER,
            "--store",
            uri,
            "--mode",
            mode,
            "--out",
            str(tmp_path / f"{tag}-{{rank}}.pt"),
        ]
        clean = {k: v for k, v in os.environ.items() if k not in ("CKPTD_JOB", "CKPTD_SOCKET")}
        return subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=180)

    res = ckptd_run("save", "save")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    res = cli("verify", uri, "--all", env=s3env.env())
    assert res.returncode == 0 and "step 5: ok" in res.stdout, res.stdout + res.stderr
    lease = json.loads(S3Store(uri[5:].split("/")[0], "torchrun").get_bytes(".ckptd/lease-00000001.json"))
    assert lease["job"].startswith("run-"), "ckptd run names the job for its lease"
    finals = [torch.load(tmp_path / f"save-{r}.pt", weights_only=True) for r in range(nproc)]
    env["CKPTD_LOCAL"] = str(tmp_path / "fresh-node")
    res = ckptd_run("restore", "restore")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for r in range(nproc):
        got = torch.load(tmp_path / f"restore-{r}.pt", weights_only=True)
        assert got["start"] == 6 and torch.equal(got["model"]["0.weight"], finals[0]["model"]["0.weight"])


def test_ls_shows_an_uncommitted_step_and_what_it_lacks(one_part, s3env):
    remote, _manifest, _data = one_part
    res = cli("ls", remote.uri, env=s3env.env())
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.lstrip("│ ").startswith("3"))
    assert "incomplete" in row, res.stdout
    listed = json.loads(cli("ls", remote.uri, "--json", env=s3env.env()).stdout)
    assert [(r["step"], r["state"]) for r in listed] == [(3, "incomplete")]
    assert "all 1 parts present" in listed[0]["detail"]


@pytest.mark.parametrize("when", ["register", "durable"])
def test_a_node_whose_daemon_is_killed_uploads_its_own_part(s3env, tmp_path, when):
    """SIGKILL one node's daemon as its rank joins or after its first commit: the rank takes over its
    uploads; every commit is still whole, and the job ends."""
    uri = f"s3://{s3env.make_bucket()}/daemon-killed"
    daemons = [DaemonProc(extra_env=s3env.env()) for _ in range(2)]

    def kill_when_registered() -> None:
        deadline = time.monotonic() + 120
        while f"daemon: {when}" not in daemons[1].output() and time.monotonic() < deadline:
            time.sleep(0.05)
        daemons[1].proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_when_registered, daemon=True)
    try:
        envs = [
            {
                **s3env.env(),
                "CKPTD_SOCKET": d.socket,
                "CKPTD_LOCAL": str(tmp_path / f"node-{i}"),
                "CKPTD_JOB": "daemon-killed",
            }
            for i, d in enumerate(daemons)
        ]
        killer.start()
        launch(tmp_path, uri, 2, "save", "save", envs, args=("--steps", "12"))
    finally:
        killer.join(timeout=5)
        for d in daemons:
            d.stop()
    assert daemons[1].proc.returncode == -signal.SIGKILL
    infos = [i for i in ckptd.list_snapshots(uri) if i.committed]
    assert [(i.step, i.world_size) for i in infos] == [(5, 2), (8, 2), (11, 2)], daemons[0].output()
    res = cli("verify", uri, "--all", env=s3env.env())
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_rank_that_looks_after_retention_pruned_its_commit_still_sees_it_committed(one_part):
    """A slow rank checks only after newer snapshots pushed its step out: committed, not missing."""
    remote, manifest, data = one_part
    assert try_commit(remote, manifest, data) == []
    rule = Retention(keep_last=1)
    delete_snapshot(remote, 3, committed=True)
    assert not remote.list("step-000000000003")
    assert try_commit(remote, manifest, data) == [], "retention removed a commit; the rank must learn it"
    assert plan(remote, rule).strays == [], "the record stays for the grace period"
    assert plan(remote, rule, now=time.time() + rule.grace + 1).strays == [pruned_key(3, manifest.attempt)]
    apply(remote, Retention(keep_last=1, grace=0))
    assert try_commit(remote, manifest, data) != [], "without the record, nothing says it was committed"
