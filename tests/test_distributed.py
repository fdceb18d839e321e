"""Several real gloo ranks: save with 2, restore with 2, 1 and 3."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _trainer import assert_tree_equal

import ckptd
from ckptd.restore.find import read_manifest
from ckptd.store.file import FileStore

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def launch(tmp_path, store, world, mode, tag, envs: list[dict] | None = None, args: tuple[str, ...] = ()):
    """``world`` gloo ranks; ``envs`` gives each rank extra environment (a node's daemon socket, local tier)."""
    init = f"file://{tmp_path}/rdzv-{tag}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "--store",
                store,
                "--rank",
                str(r),
                "--world",
                str(world),
                "--init",
                init,
                "--mode",
                mode,
                "--out",
                str(tmp_path / f"{tag}-{r}.pt"),
                *args,
            ],
            env={**os.environ, **(envs[r] if envs else {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    return [torch.load(tmp_path / f"{tag}-{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    store = str(tmp / "store")
    finals = launch(tmp, store, 2, "save", "save")
    return tmp, store, finals


def test_two_ranks_commit_one_snapshot_with_every_rank_file(saved):
    _tmp, store, _finals = saved
    infos = ckptd.list_snapshots(store)
    assert [i.step for i in infos] == [2, 5] and all(i.committed and i.world_size == 2 for i in infos)
    state = ckptd.load(store)
    assert sorted(state["rng"]) == [0, 1]
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_after_the_first_snapshot_each_rank_writes_its_share_from_its_image(saved):
    """Step 2 goes through dcp.save, which decides who writes what; step 5 is written from each rank's image,
    each value once, where DCP put it, and plain dcp.load reads it."""
    import torch.distributed.checkpoint as dcp

    _tmp, store, finals = saved
    first, second = (read_manifest(FileStore(store), s) for s in (2, 5))
    assert first.meta["io"] == "dcp" and second.meta["io"] in ("o_direct", "buffered"), second.meta["io"]

    def writers(m):
        return {i.fqn: i.file for i in m.items if i.kind != "empty"}

    assert writers(second) == writers(first)  # the same assignment, so each value is written once
    assert {f.name for f in second.files} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert len({i.fqn for i in second.items}) == len(second.items)
    model = {k: torch.zeros_like(v) for k, v in finals[0]["model"].items()}
    dcp.load({"model": model}, checkpoint_id=os.path.join(store, "step-000000000005"), no_dist=True)
    for name, value in finals[0]["model"].items():
        assert torch.equal(model[name], value), name


@pytest.mark.parametrize("world", [2, 1, 3])
def test_restore_with_another_world_size(saved, world, tmp_path):
    _tmp, store, finals = saved
    restored = launch(tmp_path, store, world, "restore", f"restore{world}")
    for r, got in enumerate(restored):
        assert got["start"] == 6
        assert_tree_equal(finals[0]["model"], got["model"], f"rank {r} model")
        assert_tree_equal(finals[0]["optimizer"], got["optimizer"], f"rank {r} optimizer")
        if r < 2:  # ranks that existed get their own generator back
            assert torch.equal(finals[r]["rng"], got["rng"])


GROWING = """
import sys, torch, torch.distributed as dist, ckptd
from torch.nn.parallel import DistributedDataParallel as DDP
rank, world, init, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.manual_seed(0)
model = DDP(torch.nn.Linear(64, 64))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

class Grows:
    def __init__(self):
        self.t = torch.zeros(4)
    def state_dict(self):
        return {"t": self.t}
    def load_state_dict(self, sd):
        self.t = sd["t"]

grows = Grows()
ckpt = ckptd.Checkpointer(store, model=model, optimizer=opt, extra={"grows": grows}, policy="every:2", keep_last=10)
for step in range(12):
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    opt.zero_grad()
    if step == 6 and rank == 1:
        grows.t = torch.zeros(16)  # only this rank's state changes shape
    grows.t += step
    ckpt.step(step)
ckpt.close()
dist.destroy_process_group()
"""


def test_a_rank_whose_state_changes_shape_sends_one_snapshot_through_dcp_then_images_resume(tmp_path):
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GROWING, str(r), "2", f"file://{tmp_path}/rdzv", store],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    ios = {s: read_manifest(FileStore(store), s).meta["io"] for s in (1, 3, 5, 7, 9, 11)}
    assert ios[1] == ios[7] == "dcp" and {ios[s] for s in (3, 5, 9, 11)} <= {"o_direct", "buffered"}, ios
    for step in (5, 7, 11):
        state = ckptd.load(store, step=step)
        total = sum(range(step + 1))
        assert torch.equal(state["extra"][0]["grows"]["t"], torch.full((4,), float(total)))
        grown = 16 if step > 6 else 4
        expect = sum(range(6, step + 1)) if step > 6 else total
        assert torch.equal(state["extra"][1]["grows"]["t"], torch.full((grown,), float(expect))), step
    res = subprocess.run([sys.executable, "-m", "ckptd.cli", "verify", store, "--all"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


ONE_RANK_CANNOT_STAGE = """
import sys, time, torch, torch.distributed as dist, ckptd
rank, world, init, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(256, 256))
opt = torch.optim.Adam(model.parameters())
budget = {"staging_budget": 4096} if rank == 1 else {}  # this rank alone cannot stage
ckpt = ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:2", **budget)
t0 = time.monotonic()
for step in range(6):
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    opt.zero_grad()
    ckpt.step(step)
try:
    ckpt.close(timeout=60)
except ckptd.CkptdError as e:
    print("close:", type(e).__name__, str(e).splitlines()[0][:300])
print(f"trained in {time.monotonic() - t0:.1f} s")
dist.destroy_process_group()
"""


def test_a_rank_that_cannot_stage_fails_the_snapshot_on_every_rank_at_once(tmp_path):
    """Rank 1 refuses to stage (its budget): every rank's snapshot fails naming it, nobody waits for it."""
    import re

    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ONE_RANK_CANNOT_STAGE, str(r), "2", f"file://{tmp_path}/rdzv", store],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    for rank, out in enumerate(outs):
        took = float(re.search(r"trained in ([0-9.]+) s", out).group(1))
        assert took < 60, out[-2000:]
        assert "over the staging_budget of 4.0 KiB" in out and (rank == 1 or "rank 1" in out), out[-2000:]
    assert not [i for i in ckptd.list_snapshots(store) if i.committed]
