"""Overhead of snapshots on training time: ckptd against DCP async_save (thread and process),
torchsnapshot async_take and torch.save, beside two floors measured the same way.

Protocol (issue 12): ~0.5 GiB of model + Adam state, one training thread,
a snapshot every 10 steps, a warm-up snapshot first, then interleaved rounds
of 30 steps without / with / without snapshots; overhead of a round is
with / mean(without) - 1, and the figure is the median over rounds. One
snapshot is in flight at a time for every method (each waits for its
previous one before the next), as a user would run them.

Floors: "copy only" copies the state into a preallocated pool in a
background thread and writes nothing; "raw O_DIRECT" does the same copy
into a 4 KiB-aligned arena, then writes it with O_DIRECT from a thread and
fsyncs (no format, no checksum). After the rounds, the persist throughput
of ckptd's local tier (its manifest's write_s) is printed beside a raw
O_DIRECT write of the same bytes with training idle (bench/persist.py
compares the two both idle). Timings here are noisy: compare within a run. Never fails on timing.

    python bench/overhead.py [--rounds 5] [--dir /tmp] [--only ckptd,copy_only,...]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

torch.set_num_threads(1)

_MiB = 1 << 20


def make_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(40)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(48, 1024)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt, x


def state_tensors(model, opt) -> list[torch.Tensor]:
    return [p.data for p in model.parameters()] + [
        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
    ]


class Method:
    """One way of taking snapshots: ``snapshot`` after optimizer.step(), ``drain`` at the end of a round."""

    def __init__(self, model, opt, work: str) -> None:
        self.model, self.opt, self.work = model, opt, work
        self.n = 0

    def before_optimizer_step(self) -> None:
        pass

    def snapshot(self) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        self.drain()


class Ckptd(Method):
    def __init__(self, model, opt, work):
        super().__init__(model, opt, work)
        import ckptd

        self.store = os.path.join(work, "ckptd")
        self.ck = ckptd.Checkpointer(self.store, model=model, optimizer=opt, policy="every:1000000000", keep_last=2)
        self.handles = []

    def snapshot(self):
        self.handles.append(self.ck.save(self.n))  # waits for the previous write itself
        self.n += 1

    def drain(self):
        self.ck.wait()

    def persist(self) -> tuple[float, int, str]:
        """Median write seconds, bytes and write path of the snapshots still in the store."""
        runs = []
        for name in sorted(os.listdir(self.store)):
            path = os.path.join(self.store, name, "ckptd.json")
            if os.path.exists(path):
                m = json.loads(open(path, "rb").read())
                runs.append((m["meta"]["write_s"], sum(f["size"] for f in m["files"]), m["meta"].get("io", "?")))
        return statistics.median(r[0] for r in runs), runs[-1][1], runs[-1][2]

    def close(self):
        self.ck.close()


class DcpAsync(Method):
    def __init__(self, model, opt, work, kind):
        super().__init__(model, opt, work)
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.kind = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
        self.fut = None
        self.own_group = False
        if kind == "process" and not torch.distributed.is_initialized():  # its writer process needs one
            torch.distributed.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
            self.own_group = True

    def snapshot(self):
        import torch.distributed.checkpoint as dcp

        self.drain()
        path = os.path.join(self.work, f"dcp{self.n}")
        shutil.rmtree(os.path.join(self.work, f"dcp{self.n - 2}"), ignore_errors=True)
        state = {"model": self.model.state_dict(), "optim": self.opt.state_dict()}
        self.fut = dcp.async_save(state, checkpoint_id=path, async_checkpointer_type=self.kind, no_dist=True)
        self.n += 1

    def drain(self):
        if self.fut is not None:
            fut = getattr(self.fut, "upload_completion", self.fut)
            fut.result()
            self.fut = None

    def close(self):
        super().close()
        if self.own_group:
            torch.distributed.destroy_process_group()


class TorchSnapshot(Method):
    def __init__(self, model, opt, work):
        super().__init__(model, opt, work)
        self.pending = None

    def snapshot(self):
        import torchsnapshot

        self.drain()
        shutil.rmtree(os.path.join(self.work, f"ts{self.n - 2}"), ignore_errors=True)
        self.pending = torchsnapshot.Snapshot.async_take(
            os.path.join(self.work, f"ts{self.n}"), app_state={"model": self.model, "optim": self.opt}
        )
        self.n += 1

    def drain(self):
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


class TorchSave(Method):
    def snapshot(self):
        torch.save(
            {"model": self.model.state_dict(), "optim": self.opt.state_dict()}, os.path.join(self.work, "torch_save.pt")
        )


class Floor(Method):
    """Copy into an aligned arena on a background thread; with ``write``, then O_DIRECT + fsync on it too."""

    def __init__(self, model, opt, work, write: bool):
        super().__init__(model, opt, work)
        self.src = state_tensors(model, opt)
        sizes = [(t.nbytes + 4095) // 4096 * 4096 for t in self.src]
        self.arena = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
        self.pool, off = [], 0
        for t, n in zip(self.src, sizes):
            self.pool.append(torch.frombuffer(self.arena, dtype=t.dtype, count=t.numel(), offset=off).view(t.shape))
            off += n
        self.write = write
        self.copied = None
        self.written = None

    def _copy(self):
        with torch.no_grad():
            for a, b in zip(self.pool, self.src):
                a.copy_(b)

    def _write(self, copied: threading.Thread):
        copied.join()
        raw_direct_write(os.path.join(self.work, "floor"), memoryview(self.arena))

    def before_optimizer_step(self):
        if self.copied is not None:
            self.copied.join()
            self.copied = None

    def snapshot(self):
        if self.written is not None:
            self.written.join()
        self.copied = threading.Thread(target=self._copy)
        self.copied.start()
        if self.write:
            self.written = threading.Thread(target=self._write, args=(self.copied,))
            self.written.start()

    def drain(self):
        self.before_optimizer_step()
        if self.written is not None:
            self.written.join()
            self.written = None


def raw_direct_write(path: str, view: memoryview) -> float:
    """Write ``view`` (aligned) with O_DIRECT in 8 MiB chunks, fsync; seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        for i in range(0, len(view), 8 * _MiB):
            os.pwrite(fd, view[i : i + 8 * _MiB], i)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


METHODS = {
    "copy_only": lambda m, o, w: Floor(m, o, w, write=False),
    "raw_o_direct": lambda m, o, w: Floor(m, o, w, write=True),
    "ckptd": Ckptd,
    "dcp_async_thread": lambda m, o, w: DcpAsync(m, o, w, "thread"),
    "dcp_async_process": lambda m, o, w: DcpAsync(m, o, w, "process"),
    "torchsnapshot": TorchSnapshot,
    "torch_save": TorchSave,
}


def measure(name: str, rounds: int, root: str) -> tuple[float, list[float], object]:
    model, opt, x = make_state()
    work = tempfile.mkdtemp(prefix=f"ckptd-overhead-{name}-", dir=root)
    method = METHODS[name](model, opt, work)
    step = [0]

    def loop(on: bool, steps: int = 30) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            method.before_optimizer_step()
            opt.step()
            if on and step[0] % 10 == 0:
                method.snapshot()
            step[0] += 1
        if on:
            method.drain()
        return time.perf_counter() - t

    try:
        loop(False, 3)
        loop(True, 1)  # the warm-up snapshot: pools, threads, processes are made here
        rs = []
        for _ in range(rounds):
            a, w, b = loop(False), loop(True), loop(False)
            rs.append(w / ((a + b) / 2) - 1)
        extra = method.persist() if isinstance(method, Ckptd) else None
        method.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return statistics.median(rs), rs, extra


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--only", default=",".join(METHODS))
    args = p.parse_args()
    model, opt, _ = make_state()
    nbytes = sum(t.nbytes for t in state_tensors(model, opt))
    del model, opt
    print(
        f"state: {nbytes / 2**30:.2f} GiB (40 x Linear(1024,1024) + Adam), 1 torch thread, a snapshot every "
        f"10 steps, {args.rounds} rounds of 30 steps without/with/without; median overhead"
    )
    results, persist = {}, None
    for name in args.only.split(","):
        try:
            med, rs, extra = measure(name, args.rounds, args.dir)
        except Exception as e:  # a competitor that cannot run here is reported, not faked
            print(f"{name:20s} could not run: {type(e).__name__}: {str(e).splitlines()[0][:90]}", flush=True)
            continue
        results[name] = med
        persist = extra or persist
        print(f"{name:20s} overhead {med * 100:6.1f}%   rounds {' '.join(f'{r * 100:+.1f}' for r in rs)}", flush=True)
    anchors = [results[k] for k in ("dcp_async_thread", "dcp_async_process", "torchsnapshot") if k in results]
    if "ckptd" in results and anchors:
        best = min(anchors)
        print(
            f"best anchor {best * 100:.1f}% / ckptd {results['ckptd'] * 100:.1f}% = "
            f"{best / results['ckptd'] if results['ckptd'] > 0 else float('inf'):.1f}x"
        )
    if persist is not None:
        write_s, size, io = persist
        buf = mmap.mmap(-1, (size + 4095) // 4096 * 4096)
        buf.write(os.urandom(_MiB) * (len(buf) // _MiB) + b"\0" * (len(buf) % _MiB))
        path = os.path.join(args.dir, f"ckptd-raw-{os.getpid()}")
        raw = statistics.median(raw_direct_write(path, memoryview(buf)) for _ in range(3))
        os.unlink(path)
        print(
            f"persist, local tier, while training: ckptd {size / write_s / _MiB:.0f} MiB/s ({io}, median write_s "
            f"{write_s:.3f} s); raw O_DIRECT write of {size / _MiB:.0f} MiB, training idle, "
            f"{size / raw / _MiB:.0f} MiB/s; ratio {raw / write_s:.2f} (bench/persist.py compares both idle)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
