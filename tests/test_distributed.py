"""Several real gloo ranks: save with 2, restore with 2, 1 and 3."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _trainer import assert_tree_equal

import ckptd

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
