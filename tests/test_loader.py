"""Data-loader position in a snapshot: a plain DataLoader resumes at the same batch, in the same order."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import ckptd
from ckptd.errors import ConfigError

N, BATCH = 96, 8  # 12 batches an epoch


def make_loader(kind: str) -> DataLoader:
    data = TensorDataset(torch.arange(N), torch.randn(N, 4, generator=torch.Generator().manual_seed(5)))
    if kind == "generator":
        return DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2))
    if kind == "global":  # shuffle and worker seed drawn from the global RNG, which dropout also uses
        return DataLoader(data, batch_size=BATCH, shuffle=True)
    if kind == "workers":
        return DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2))
    raise ValueError(kind)


def train(store, kind: str, steps: int, *, stop_after: int | None = None, as_extra: bool = False, seed: int = 1234):
    """Train ``steps`` steps over epochs of ``loader``; the user loop has no data-position code at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = make_loader(kind)
    torch.manual_seed(seed)
    where = {"extra": {"data": loader}} if as_extra else {"loader": loader}
    seen = []
    with ckptd.Checkpointer(str(store), model=model, optimizer=opt, policy="every:1", **where) as ck:
        step = ck.restore()
        while step < steps:
            for idx, x in loader:
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen.append((step, idx.tolist(), loss.item().hex()))
                ck.step(step)
                step += 1
                if step == stop_after or step >= steps:
                    return seen, model
    return seen, model


@pytest.mark.parametrize(
    "kind,stop", [("generator", 17), ("global", 17), ("global", 12), ("generator", 1), ("workers", 5), ("stateful", 17)]
)
def test_loader_resumes_at_the_same_batch_bitwise(tmp_path, kind, stop):
    want, ref = train(tmp_path / "ref", kind, 30)
    first, _ = train(tmp_path / "s", kind, 30, stop_after=stop)
    rest, model = train(tmp_path / "s", kind, 30, seed=99)  # a restarted process: another RNG
    assert first == want[:stop]
    if kind == "stateful":  # its own resume is exact to the epoch's end; its next shuffle is its own affair
        assert rest[: 24 - stop] == want[stop:24]
        return
    assert rest == want[stop:]
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_a_loader_in_extra_is_saved_by_its_position(tmp_path):
    want, _ = train(tmp_path / "ref", "global", 20, as_extra=True)
    train(tmp_path / "s", "global", 20, stop_after=7, as_extra=True)
    rest, _ = train(tmp_path / "s", "global", 20, as_extra=True, seed=99)
    assert rest == want[7:]


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


def test_iterable_dataset_without_state_warns_once_at_construction(tmp_path):
    model = nn.Linear(1, 1)
    with pytest.warns(UserWarning, match=r"loader will not resume at the saved batch.*Stream.*state_dict"):
        ck = ckptd.Checkpointer(str(tmp_path), model=model, loader=DataLoader(Stream()), policy="every:1")
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        ck.save(0).durable.result(timeout=60)
        ck.restore()
    ck.close()
    assert not [w for w in later if "ckptd" in str(w.message)]


def test_unsaveable_extra_is_refused_at_construction(tmp_path):
    class Bad:
        def state_dict(self):
            return {"when": object()}

        def load_state_dict(self, sd):
            pass

    with pytest.raises(ConfigError, match=r"extra.0.bad.when.*convert it"):
        ckptd.Checkpointer(str(tmp_path), model=nn.Linear(1, 1), extra={"bad": Bad()}, policy="every:1")


def test_inspect_shows_every_group(tmp_path):
    class Counter:
        n = 7

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, sd):
            pass

    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    loader = make_loader("generator")
    with ckptd.Checkpointer(
        str(tmp_path),
        model=model,
        optimizer=opt,
        scheduler=sched,
        loader=loader,
        extra={"counter": Counter()},
        policy="every:1000",
    ) as ck:
        it = iter(loader)
        next(it), next(it)
        ck.save(4)
    out = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "inspect", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups = json.loads(out)["groups"]
    assert groups["optimizer"][""][0]["lr"] == 3e-4 and groups["optimizer"][""][0]["params"] == 2
    assert groups["scheduler"]["step_size"] == 3
    assert groups["loader"]["0"]["consumed"] == 2 and groups["loader"]["0"]["mid_epoch"] is True
    assert groups["extra"]["0"]["counter"] == {"n": 7}
    text = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "inspect", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    for word in ("optimizer", "lr", "scheduler", "step_size", "loader", "consumed", "extra", "counter"):
        assert word in text
