"""Snapshot and restore in one process: format, integrity, isolation, errors."""

from __future__ import annotations

import copy
import json
import os
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _trainer import assert_tree_equal
from torch import nn

import ckptd
from ckptd.errors import (
    ConfigError,
    IncompatibleSnapshot,
    InsufficientMemory,
    NoSnapshot,
    SnapshotCorrupt,
    SnapshotError,
    StoreUnreachable,
)


class Counter:
    """A stateful extra object, as a data-loader position would be."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self):
        return {"n": self.n, "history": [self.n, "x"]}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def make(seed: int = 0, width: int = 64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched, Counter()


def train_step(model, opt, sched, counter):
    loss = model(torch.randn(16, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    counter.n += 1
    return loss.item()


def ckpt_for(store, model, opt, sched, counter, **kw):
    kw.setdefault("policy", "every:1000")
    return ckptd.Checkpointer(str(store), model=model, optimizer=opt, scheduler=sched, extra={"counter": counter}, **kw)


def run(store, steps, policy="every:2", **kw):
    model, opt, sched, counter = make()
    with ckpt_for(store, model, opt, sched, counter, policy=policy, **kw) as ck:
        for s in range(ck.restore(), steps):
            train_step(model, opt, sched, counter)
            ck.step(s)
    return model, opt, sched, counter


def test_public_names_are_exported():
    assert set(ckptd.__all__) <= set(dir(ckptd)) | set(ckptd._LAZY)
    for name in ckptd.__all__:
        assert getattr(ckptd, name) is not None


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, ckptd; ckptd.list_snapshots; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_round_trip_restores_every_object(tmp_path):
    model, opt, sched, counter = run(tmp_path, 6)
    m2, o2, s2, c2 = make(seed=1)
    with ckpt_for(tmp_path, m2, o2, s2, c2) as ck:
        assert ck.restore() == 6
    assert_tree_equal(model.state_dict(), m2.state_dict())
    assert_tree_equal(opt.state_dict(), o2.state_dict())
    assert sched.state_dict() == s2.state_dict()
    assert c2.n == 6


def test_empty_store_restores_to_zero(tmp_path):
    model, opt, sched, counter = make()
    with ckpt_for(tmp_path, model, opt, sched, counter, policy="every:1") as ck:
        assert ck.restore() == 0
        with pytest.raises(NoSnapshot):
            ck.restore(step=3)


def test_dcp_load_reads_a_snapshot_as_it_is(tmp_path):
    model, *_ = run(tmp_path, 4)
    fresh, *_ = make(seed=5)
    sd = {"model": fresh.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path / "step-000000000003"))
    fresh.load_state_dict(sd["model"])
    assert_tree_equal(model.state_dict(), fresh.state_dict())


def test_load_returns_plain_state(tmp_path):
    model, opt, sched, counter = run(tmp_path, 4)
    state = ckptd.load(str(tmp_path))
    assert set(state) == {"model", "optimizer", "scheduler", "extra", "rng", "meta"}
    assert state["meta"]["step"] == 3
    assert state["extra"][0]["counter"] == {"n": 4, "history": [4, "x"]}
    assert_tree_equal(state["model"], model.state_dict())
    assert isinstance(state["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    infos = ckptd.list_snapshots(str(tmp_path))
    assert [i.step for i in infos] == [1, 3] and all(i.committed for i in infos)
    assert infos[-1].created.tzinfo is not None and infos[-1].nbytes > 0


def test_manifestless_directory_is_ignored(tmp_path):
    run(tmp_path, 4)
    partial = tmp_path / "step-000000000099"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a snapshot")
    model, opt, sched, counter = make(seed=3)
    with ckpt_for(tmp_path, model, opt, sched, counter) as ck:
        assert ck.restore() == 4
    infos = {i.step: i for i in ckptd.list_snapshots(str(tmp_path))}
    assert infos[99].committed is False


@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata", "ckptd.json"])
def test_flipped_byte_falls_back_to_previous_snapshot(tmp_path, victim):
    run(tmp_path, 6)
    path = tmp_path / "step-000000000005" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    model, opt, sched, counter = make(seed=3)
    with ckpt_for(tmp_path, model, opt, sched, counter) as ck:
        with pytest.warns(UserWarning, match="skipping step-000000000005"):
            assert ck.restore() == 4
        with pytest.raises(SnapshotCorrupt):
            ck.restore(step=5)


def test_truncated_file_is_detected(tmp_path):
    run(tmp_path, 4)
    path = tmp_path / "step-000000000003" / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="skipping"):
        state = ckptd.load(str(tmp_path))
    assert state["meta"]["step"] == 1


def test_state_mutated_after_step_does_not_leak(tmp_path):
    model, opt, sched, counter = make(width=512)
    with ckpt_for(tmp_path, model, opt, sched, counter, policy="every:1000") as ck:
        train_step(model, opt, sched, counter)
        handle = ck.save(0)
        expected = {
            "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict()),
            "scheduler": copy.deepcopy(sched.state_dict()),
        }
        # The next step changes buffers (forward), parameters and optimizer state
        # (optimizer.step, which waits for staging), scheduler and extra at once.
        train_step(model, opt, sched, counter)
        handle.durable.result(timeout=60)
    state = ckptd.load(str(tmp_path))
    assert_tree_equal(expected["model"], state["model"], "model")
    assert_tree_equal(expected["optimizer"], state["optimizer"], "optimizer")
    assert expected["scheduler"] == state["scheduler"]
    assert state["extra"][0]["counter"]["n"] == 1
    assert not torch.equal(model[0].weight, state["model"]["0.weight"])


def test_without_overlap_edits_outside_optimizer_step_do_not_leak(tmp_path):
    model, opt, sched, counter = make(width=512)
    with ckpt_for(tmp_path, model, opt, sched, counter, overlap=False) as ck:
        train_step(model, opt, sched, counter)
        handle = ck.save(0)
        expected = copy.deepcopy(model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # an EMA-like edit outside optimizer.step()
        handle.durable.result(timeout=60)
    assert_tree_equal(expected, ckptd.load(str(tmp_path))["model"])


def test_save_returns_staged_and_durable_futures(tmp_path):
    model, opt, sched, counter = make()
    with ckpt_for(tmp_path, model, opt, sched, counter) as ck:
        train_step(model, opt, sched, counter)
        h = ck.save(7, loss=0.5)
        h.staged.result(timeout=30)
        info = h.durable.result(timeout=30)
        assert h.state is ckptd.SnapshotState.DURABLE
    assert info.step == 7 and info.committed and info.metrics == {"loss": 0.5}


def test_retention_keeps_last_and_collects_stale_incomplete(tmp_path):
    stale = tmp_path / "step-000000000000"
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale / "__0_0.distcp", (old, old))
    fresh = tmp_path / "step-000000000051"
    fresh.mkdir()
    (fresh / "__0_0.distcp").write_bytes(b"y")
    run(tmp_path, 10, keep_last=2)
    steps = {i.step: i.committed for i in ckptd.list_snapshots(str(tmp_path))}
    assert steps == {51: False, 7: True, 9: True}


def test_unwritable_store_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model, opt, sched, counter = make()
    with pytest.raises(StoreUnreachable, match=str(blocker)):
        ckpt_for(blocker / "store", model, opt, sched, counter)


def test_bad_options_are_one_clear_error(tmp_path):
    model, opt, sched, counter = make()
    with pytest.raises(ConfigError, match="keep_lats"):
        ckpt_for(tmp_path, model, opt, sched, counter, keep_lats=3)
    with pytest.raises(ConfigError, match="every:50"):
        ckpt_for(tmp_path, model, opt, sched, counter, policy="sometimes")
    with pytest.raises(ConfigError, match="unknown scheme"):
        ckpt_for("gs://bucket/x", model, opt, sched, counter)


def test_incompatible_model_names_tensor_and_shapes(tmp_path):
    run(tmp_path, 2)
    model, opt, sched, counter = make(width=32)
    with ckpt_for(tmp_path, model, opt, sched, counter) as ck:
        with pytest.raises(
            IncompatibleSnapshot, match=r"'0.weight': snapshot has shape \(64, 8\), the model has \(32, 8\)"
        ):
            ck.restore()


def test_background_failure_warns_at_step_and_raises_at_close(tmp_path):
    model, opt, sched, counter = make()
    (tmp_path / "step-000000000001").write_text("a file where the snapshot directory goes")
    ck = ckpt_for(tmp_path, model, opt, sched, counter, policy="every:2")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for s in range(6):
            train_step(model, opt, sched, counter)
            ck.step(s)
    assert any("snapshot of step 1 failed" in str(w.message) for w in seen)
    with pytest.raises(SnapshotError, match="step 1"):
        ck.close()
    assert [i.step for i in ckptd.list_snapshots(str(tmp_path)) if i.committed] == [3, 5]


def test_snapshot_over_budget_is_refused_and_training_goes_on(tmp_path):
    model, opt, sched, counter = make()
    ck = ckpt_for(tmp_path, model, opt, sched, counter, policy="every:1", staging_budget=1024)
    with pytest.raises(InsufficientMemory, match="staging_budget"):
        ck.save(0)
    with pytest.warns(ckptd.snapshot.failures.SnapshotFailedWarning, match="not taken"):
        train_step(model, opt, sched, counter)
        assert ck.step(0) is False
    with pytest.raises(SnapshotError):
        ck.close()


def test_non_plain_extra_state_is_refused_with_the_fix(tmp_path):
    class Bad:
        def state_dict(self):
            return {"when": object()}

        def load_state_dict(self, sd):
            pass

    model, opt, sched, _ = make()
    with pytest.raises(ConfigError, match=r"extra.0.bad.when.*convert it"):  # at construction, not at save
        ckptd.Checkpointer(str(tmp_path), model=model, optimizer=opt, extra={"bad": Bad()}, policy="every:1")


def test_attach_drives_snapshots_from_optimizer_step(tmp_path):
    def go(store, steps, stop=None):
        model, opt, sched, _ = make()
        ck = ckptd.attach(model, opt, store=str(store), scheduler=sched, policy="every:3")
        start = ck.restore()
        torch.manual_seed(100 + start)
        for _ in range(start, stop or steps):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        ck.close()
        return model, opt, sched, start

    ref_model, ref_opt, ref_sched, _ = go(tmp_path / "ref", 6)
    go(tmp_path / "cut", 6, stop=3)  # snapshots after optimizer step 2
    model, opt, sched, start = go(tmp_path / "cut", 6)
    assert start == 3
    assert sched.state_dict() == ref_sched.state_dict()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_manifest_rejects_paths_outside_the_snapshot(tmp_path):
    run(tmp_path, 2)
    path = tmp_path / "step-000000000001" / "ckptd.json"
    raw = json.loads(path.read_bytes())
    raw.pop("digest")
    raw["files"][0]["name"] = "../../etc/passwd"
    from ckptd.snapshot.manifest import _digest

    raw["digest"] = _digest(raw)
    path.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="outside its snapshot"):
        with pytest.raises(NoSnapshot):
            ckptd.load(str(tmp_path))


@pytest.fixture
def tiny_disk(small_tmpfs):
    """A 2 MiB tmpfs, so the local tier really fills."""
    return small_tmpfs("2m")


def test_full_local_tier_skips_snapshots_and_keeps_the_committed(tiny_disk):
    def big(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.Linear(256, 2))
        opt = torch.optim.AdamW(model.parameters())  # about 0.8 MiB per snapshot with its moments
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 3), Counter()

    def train_step(model, opt, sched, counter):
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    model, opt, sched, counter = big(0)
    store = str(tiny_disk / "store")
    ck = ckpt_for(store, model, opt, sched, counter, policy="every:1", keep_last=10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for s in range(8):
            train_step(model, opt, sched, counter)
            ck.step(s)
    with pytest.raises(SnapshotError):
        ck.close()
    assert any("full" in str(w.message) or "No space" in str(w.message) for w in seen)
    infos = ckptd.list_snapshots(store)
    assert infos and all(i.committed for i in infos), "a failed write must not leave a partial snapshot"
    m2, o2, s2, c2 = big(1)
    with ckpt_for(store, m2, o2, s2, c2) as ck2:
        assert ck2.restore() == infos[-1].step + 1


def test_a_repeated_failure_is_reported_once_and_then_summarized(tmp_path, caplog):
    model, opt, sched, counter = make()
    ck = ckpt_for(tmp_path, model, opt, sched, counter, policy="every:1", staging_budget=1024)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level("INFO", logger="ckptd"):
        warnings.simplefilter("always")
        for s in range(30):
            train_step(model, opt, sched, counter)
            ck.step(s)
    said = [str(w.message) for w in seen if issubclass(w.category, ckptd.snapshot.failures.SnapshotFailedWarning)]
    assert len(said) == 3  # the first, then a summary at the 2nd and the 10th
    assert "step 0" in said[0] and "2 times" in said[1] and "10 times" in said[2]
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "not taken" in r.getMessage()]
    with pytest.raises(SnapshotError, match="30 snapshots failed"):
        ck.close()


def _threads_and_fds() -> tuple[set[str], int]:
    return {t.name for t in __import__("threading").enumerate()}, len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("rejected", ["local= on a file store", "a store another job holds"])
def test_a_rejected_constructor_leaves_no_thread_fd_or_hook_behind(tmp_path, monkeypatch, rejected):
    """Whatever the constructor had opened before it refused is released: threads, files, optimizer hooks."""
    model, opt, sched, counter = make()
    store = str(tmp_path / "s")
    holder = None
    if rejected == "a store another job holds":
        other = make(seed=1)
        monkeypatch.setenv("CKPTD_JOB", "first-job")
        holder = ckptd.Checkpointer(store, model=other[0], optimizer=other[1])
        monkeypatch.setenv("CKPTD_JOB", "second-job")

    def refused() -> str:
        with pytest.raises(ckptd.CkptdError) as err:
            ckptd.Checkpointer(
                store, model=model, optimizer=opt, **({"local": str(tmp_path / "l")} if holder is None else {})
            )
        return str(err.value)

    message = refused()  # the first may import what opens a file once (/dev/urandom)
    assert "\n" not in message and ("drop local=" in message or "first-job" in message), message
    threads, fds = _threads_and_fds()
    for _ in range(3):
        refused()
    time.sleep(0.2)  # a thread that was told to stop has had time to
    after_threads, after_fds = _threads_and_fds()
    assert after_threads <= threads and after_fds <= fds, (after_threads - threads, after_fds, fds)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    if holder is not None:
        holder.close()
