"""The S3 tier end to end: promotion, restore on a fresh node, outages, corrupt local copies, ranks."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from _trainer import assert_same_state, read_losses, run_trainer
from test_snapshot import ckpt_for, make, run, train_step

import ckptd
from ckptd.store.s3 import S3Store

ARGS = ("--steps", "24", "--policy", "every:4", "--width", "256")


def test_snapshots_become_durable_in_s3(bucket, tmp_path):
    model, opt, sched, counter = make()
    uri = f"s3://{bucket}/run"
    with ckpt_for(uri, model, opt, sched, counter, policy="every:2", local=str(tmp_path / "tier")) as ck:
        for s in range(6):
            train_step(model, opt, sched, counter)
            ck.step(s)
        ck.wait()
        infos = ck.snapshots()
        handle = ck.save(6)
        ck.wait()
    assert [(i.step, i.tiers) for i in infos] == [(1, ("local", "s3")), (3, ("local", "s3")), (5, ("local", "s3"))]
    durable = handle.durable.result()  # a durable snapshot is named where it is durable, not in the local tier
    assert durable.uri == f"{uri}/step-000000000006" and "s3" in durable.tiers, durable
    remote = ckptd.list_snapshots(uri)
    assert [i.step for i in remote] == [3, 5, 6] and all(i.committed and i.tiers == ("s3",) for i in remote)


def test_fresh_node_resumes_from_s3_bitwise(s3env, tmp_path):
    bucket = s3env.make_bucket()
    uri = f"s3://{bucket}/run"
    ref = run_trainer(
        str(tmp_path / "ref"), *ARGS, "--out", str(tmp_path / "ref.pt"), "--loss-log", str(tmp_path / "ref.log")
    )
    assert ref.returncode == 0
    env = {**s3env.env(), "CKPTD_LOCAL": str(tmp_path / "node-a")}
    first = run_trainer(uri, *ARGS, "--loss-log", str(tmp_path / "run.log"), env=env, kill_on=r"step 15: durable")
    assert first.killed_after is not None
    shutil.rmtree(tmp_path / "node-a")  # the node and its disk are gone
    env["CKPTD_LOCAL"] = str(tmp_path / "node-b")
    second = run_trainer(
        uri, *ARGS, "--loss-log", str(tmp_path / "run.log"), "--out", str(tmp_path / "run.pt"), env=env
    )
    assert second.returncode == 0, "\n".join(second.lines[-20:])
    assert any("starting at step 16" in line for line in second.lines)
    assert_same_state(str(tmp_path / "ref.pt"), str(tmp_path / "run.pt"))
    assert read_losses(str(tmp_path / "run.log")) == read_losses(str(tmp_path / "ref.log"))


def test_corrupt_local_copy_falls_back_to_s3(bucket, tmp_path):
    uri, tier = f"s3://{bucket}/run", str(tmp_path / "tier")
    model, *_ = run(uri, 4, local=tier)
    victim = os.path.join(tier, "step-000000000003", "__0_0.distcp")
    data = bytearray(open(victim, "rb").read())
    data[100] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    m2, o2, s2, c2 = make(seed=7)
    with ckpt_for(uri, m2, o2, s2, c2, local=tier) as ck:
        with pytest.warns(UserWarning, match="downloading step-000000000003"):
            assert ck.restore() == 4
    assert torch.equal(m2[0].weight, model[0].weight)


def test_outage_keeps_training_and_promotion_catches_up(s3env, tmp_path):
    bucket = s3env.make_bucket()
    model, opt, sched, counter = make()
    uri = f"s3://{bucket}/run"
    ck = ckpt_for(uri, model, opt, sched, counter, policy="every:2", keep_last=1, local=str(tmp_path / "tier"))
    for s in range(2):
        train_step(model, opt, sched, counter)
        ck.step(s)
    ck.wait()
    s3env.kill()
    try:
        t0 = time.monotonic()
        for s in range(2, 8):
            train_step(model, opt, sched, counter)
            ck.step(s)
        assert time.monotonic() - t0 < 20, "training must not wait for the object store"
        deadline = time.monotonic() + 30
        while len(ck.backlog) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ck.backlog == [3, 5, 7]
        local = [i.step for i in ckptd.list_snapshots(str(tmp_path / "tier"))]
        assert local == [3, 5, 7], "local retention must keep what is not durable, whatever keep_last says"
    finally:
        s3env.start()
    ck.close(timeout=120)
    remote = [i.step for i in ckptd.list_snapshots(uri) if i.committed]
    assert remote == [7], "promotion caught up in order and retention then kept the newest"
    assert [i.step for i in ckptd.list_snapshots(str(tmp_path / "tier"))][-1] == 7


def test_two_writers_of_one_step_commit_once(bucket, tmp_path):
    from ckptd.errors import SnapshotExists
    from ckptd.persist.transfer import upload_snapshot
    from ckptd.store.file import FileStore

    a, b = tmp_path / "a", tmp_path / "b"
    run(a, 2, policy="every:2")
    run(b, 2, policy="every:2")  # same step, another commit (its own created time)
    remote = S3Store(bucket, "race")
    upload_snapshot(FileStore(str(a)), 1, remote)
    with pytest.raises(SnapshotExists):
        upload_snapshot(FileStore(str(b)), 1, remote)
    assert remote.get_bytes("step-000000000001/ckptd.json") == (a / "step-000000000001" / "ckptd.json").read_bytes()


def test_two_gloo_ranks_promote_one_snapshot(s3env, tmp_path):
    from test_distributed import launch

    bucket = s3env.make_bucket()
    uri = f"s3://{bucket}/ddp"
    os.environ["CKPTD_LOCAL"] = str(tmp_path / "tier")
    try:
        finals = launch(tmp_path, uri, 2, "save", "s3save")
        shutil.rmtree(tmp_path / "tier")
        restored = launch(tmp_path, uri, 2, "restore", "s3restore")
    finally:
        del os.environ["CKPTD_LOCAL"]
    infos = ckptd.list_snapshots(uri)
    assert [i.step for i in infos if i.committed] == [2, 5] and infos[-1].world_size == 2
    names = {o.key.split("/")[-1] for o in S3Store(bucket, "ddp").list("step-000000000005")}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "ckptd.json", "part-00000.json", "part-00001.json"} <= names
    for got in restored:
        assert got["start"] == 6
        assert torch.equal(got["model"]["0.weight"], finals[0]["model"]["0.weight"])


def test_load_reads_a_snapshot_that_is_only_in_s3(bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    model, *_ = run(uri, 4, local=str(tmp_path / "tier"))
    shutil.rmtree(tmp_path / "tier")
    state = ckptd.load(uri)
    assert state["meta"]["step"] == 3
    assert torch.equal(state["model"]["0.weight"], model[0].weight)


def test_slow_object_store_never_slows_training(s3env, tmp_path, monkeypatch):
    """S3 behind a proxy at 4 MiB/s with 20 ms per chunk: steps keep their pace, uploads finish later."""
    from _faultproxy import FaultProxy

    bucket = s3env.make_bucket()
    proxy = FaultProxy(int(s3env.endpoint.rsplit(":", 1)[1]))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        proxy.latency, proxy.bandwidth = 0.02, 4 << 20
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.Linear(512, 512), torch.nn.Linear(512, 2))
        opt = torch.optim.AdamW(model.parameters())  # about 3 MiB per snapshot
        uri = f"s3://{bucket}/slow"
        ck = ckptd.Checkpointer(uri, model=model, optimizer=opt, policy="every:5", local=str(tmp_path / "tier"))
        times = []
        for s in range(30):
            t0 = time.monotonic()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ck.step(s)
            times.append(time.monotonic() - t0)
        assert max(times) < 1.0, f"a step took {max(times):.2f} s behind a slow store"
        assert ck.backlog, "at 4 MiB/s the uploads must still be queued"
        ck.close(timeout=180)
        assert [i.step for i in ckptd.list_snapshots(uri) if i.committed] == [19, 24, 29]
    finally:
        proxy.close()


def test_take_over_after_close_fails_the_waiting_snapshot_instead_of_leaving_it_pending(bucket, tmp_path):
    from ckptd.persist.retention import Retention
    from ckptd.persist.tiers import Tiers
    from ckptd.restore.find import read_manifest_bytes
    from ckptd.snapshot.dirs import LocalCommit
    from ckptd.snapshot.manifest import Manifest, step_dir
    from ckptd.store import open_store
    from ckptd.store.file import FileStore

    local = tmp_path / "local"
    run(local, 2, policy="every:2")  # one committed snapshot (step 1) in a plain local tier
    data = read_manifest_bytes(FileStore(str(local)), 1)
    done = LocalCommit(Manifest.from_json(data, source="test"), data, str(local / step_dir(1)), True)
    tiers = Tiers(
        open_store(f"s3://{bucket}/t"),
        local=str(local),
        rank=0,
        world_size=1,
        rule=Retention(keep_last=3),
        external=True,
    )
    durable = tiers.committed(done)  # the daemon uploads: the future waits for its word
    tiers.close()
    tiers.take_over()  # the daemon link's thread finds the daemon gone, after the trainer closed
    with pytest.raises(ckptd.StoreError, match="closed first"):
        durable.result(timeout=10)
    assert not open_store(f"s3://{bucket}/t").children("")  # nothing was uploaded behind the closed Checkpointer
