"""Stage: copy tensors into host buffers that are allocated once and reused.

Staging is the only part of a snapshot that may stall training. On CUDA the
copies run on a side stream into pinned memory and complete through an
event; on CPU they run on a background thread. Either way the caller gets a
future that completes when every byte is in host memory.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Protocol

import psutil
import torch

from ..errors import InsufficientMemory
from .image import ALIGN, Layout, Placed, Templates, fill_headers, plan

log = logging.getLogger("ckptd")

Pair = tuple[torch.Tensor, torch.Tensor]
"""(source, host buffer) of one copy."""

_GiB = 1 << 30


class Stager(Protocol):
    """Copies source tensors into host buffers. Thread-safe for one caller.

    Call sequence the hook relies on:

    1. ``copy(pairs, wait=True)`` for state that changes outside
       ``optimizer.step()``: every copy has finished when it returns.
    2. ``copy(pairs, wait=False)`` for parameters and optimizer state: returns
       at once; the future completes when the copies have, and carries any error.
    3. ``close()`` waits for in-flight copies and releases threads and streams.
    """

    def copy(self, pairs: Sequence[Pair], *, wait: bool) -> Future[None]: ...

    def close(self) -> None: ...


class FileImage:
    """One data file's image in host memory: page-aligned, records' constant bytes in place.

    ``tensors`` are views at each tensor's data offset, so a staging copy
    lands where the writer sends it from. Pinned on CUDA by registering the
    pages with the driver (``cudaHostRegister``), so device→host copies run
    asynchronously on a side stream. Not thread-safe.
    """

    def __init__(self, layout: Layout, *, pin: bool) -> None:
        self.layout = layout
        self.size = max(layout.size, ALIGN)
        # Private anonymous memory: page-aligned, and MAP_POPULATE faults it in now rather than in the first copy.
        self._mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
        self.view = memoryview(self._mm)
        fill_headers(self.view, layout)
        self._base = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._pinned = _register(self._base) if pin else False
        self.tensors = {p.fqn: _at(self._base, p) for p in layout.placed}

    def close(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._base.data_ptr())
            self._pinned = False
        self.tensors = {}


def _at(base: torch.Tensor, p: Placed) -> torch.Tensor:
    return base[p.data : p.data + p.nbytes].view(p.dtype).view(p.shape)


def _register(base: torch.Tensor) -> bool:
    """Page-lock the image for the CUDA driver; False (and a log line) if it refuses."""
    err = torch.cuda.cudart().cudaHostRegister(base.data_ptr(), base.numel(), 0)
    if int(err) != 0:
        log.warning(
            "ckptd: cudaHostRegister of the %.2f GiB staging pool failed (%s); copies from the GPU will be synchronous",
            base.numel() / _GiB,
            err,
        )
        return False
    return True


Spec = tuple[str, tuple[int, ...], torch.dtype]


def _specs(tensors: dict[str, torch.Tensor]) -> list[Spec] | None:
    """(fqn, shape, dtype) of each tensor, or None if one cannot live in a file image (sparse, DTensor...)."""
    out = []
    for fqn, t in tensors.items():
        if t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
        out.append((fqn, tuple(t.shape), t.dtype))
    return out


class HostPool:
    """Host staging memory, allocated once and reused: the file image of this rank's data file.

    Tensors that cannot be laid out in an image get one plain buffer each
    (and the writer saves them through DCP). Pinned when ``pin`` (CUDA
    jobs). Bounded by ``budget`` bytes and by the host's available memory
    less ``reserve``; growth beyond either raises InsufficientMemory instead
    of swapping or inviting the OOM killer. ``prepare`` lays the pool out on
    a background thread before the first snapshot; ``buffers_for`` waits for
    it. Not thread-safe otherwise: one snapshot leases it at a time.
    """

    def __init__(self, *, pin: bool, budget: int | None = None, reserve: int = _GiB) -> None:
        self.pin = pin
        self.budget = budget
        self.reserve = reserve
        self.image: FileImage | None = None
        self._bufs: dict[str, torch.Tensor] = {}
        self._templates = Templates()
        self._preparing: Future | None = None

    @property
    def nbytes(self) -> int:
        if self.image is not None:
            return self.image.size
        return sum(b.nbytes for b in self._bufs.values())

    def prepare(self, tensors: dict[str, torch.Tensor]) -> Future[None]:
        """Lay out and fault in the pool for tensors like ``tensors`` on a background thread."""
        specs = _specs(tensors)
        fut: Future[None] = Future()
        if specs is None or self._matches(specs):
            fut.set_result(None)
            return fut

        def run() -> None:
            try:
                self._image_for(specs, step=None)
            except BaseException as e:  # buffers_for lays out again and raises it where it matters
                fut.set_exception(e)
            else:
                fut.set_result(None)

        self._preparing = fut
        # not a daemon: killed inside torch at interpreter exit, it would abort the process
        threading.Thread(target=run, name="ckptd-pool").start()
        return fut

    def buffers_for(self, specs: dict[str, torch.Tensor], *, step: int) -> dict[str, torch.Tensor]:
        """A host buffer shaped like each tensor in ``specs``, reusing the pool when they match."""
        if self._preparing is not None:
            wait_futures([self._preparing])
            self._preparing = None
        laid = _specs(specs)
        if laid is not None:
            return dict(self._image_for(laid, step=step).tensors)
        return self._plain_for(specs, step)

    def _matches(self, specs: list[Spec]) -> bool:
        img = self.image
        return img is not None and [(p.fqn, p.shape, p.dtype) for p in img.layout.placed] == specs

    def _image_for(self, specs: list[Spec], *, step: int | None) -> FileImage:
        if self.image is not None and self._matches(specs):
            return self.image
        layout = plan(specs, self._templates)
        size = max(layout.size, ALIGN)
        self._check(step, size, size)
        old, self.image, self._bufs = self.image, None, {}
        if old is not None:
            old.close()
        self.image = FileImage(layout, pin=self.pin)
        log.info(
            "ckptd: staging pool %.2f GiB, laid out as the file image%s", size / _GiB, " (pinned)" if self.pin else ""
        )
        return self.image

    def _plain_for(self, specs: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        keep = {k: b for k, b in self._bufs.items() if k in specs and _fits(b, specs[k])}
        grow = sum(t.nbytes for k, t in specs.items() if k not in keep)
        total = sum(b.nbytes for b in keep.values()) + grow
        self._check(step, total, grow)
        if self.image is not None:
            self.image.close()
            self.image = None
        self._bufs = keep
        for key, t in specs.items():
            if key not in keep:
                self._bufs[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        if grow:
            log.info("ckptd: staging pool %.2f GiB%s", total / _GiB, " (pinned)" if self.pin else "")
        return {k: self._bufs[k] for k in specs}

    def _check(self, step: int | None, total: int, grow: int) -> None:
        which = "the first snapshot" if step is None else f"snapshot of step {step}"
        if self.budget is not None and total > self.budget:
            raise InsufficientMemory(
                f"{which} needs {_size(total)} of staging memory, over the "
                f"staging_budget of {_size(self.budget)}; raise staging_budget or save less state"
            )
        if not grow:
            return
        avail = psutil.virtual_memory().available + (self.image.size if self.image is not None else 0)
        if grow > avail - self.reserve:
            raise InsufficientMemory(
                f"{which} needs {_size(grow)} more host memory for staging, "
                f"but only {_size(avail)} is available (keeping {_size(self.reserve)} "
                "free); free host memory or give the job a larger node"
            )

    def close(self) -> None:
        """Free the pool, after a layout still being made in the background has finished."""
        if self._preparing is not None:
            wait_futures([self._preparing])
            self._preparing = None
        if self.image is not None:
            self.image.close()
            self.image = None
        self._bufs = {}


def _size(n: int) -> str:
    """Bytes in the unit that reads best: 4.0 KiB, 12.5 MiB, 1.50 GiB."""
    if n >= _GiB:
        return f"{n / _GiB:.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def _fits(buf: torch.Tensor, like: torch.Tensor) -> bool:
    return buf.shape == like.shape and buf.dtype == like.dtype


def _copy_all(pairs: Sequence[Pair]) -> None:
    with torch.no_grad():
        for src, dst in pairs:
            dst.copy_(src)


class ThreadStager:
    """Copies on one background thread (CPU tensors). Thread-safe."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-stage")

    def copy(self, pairs: Sequence[Pair], *, wait: bool) -> Future[None]:
        if wait:
            return _run_now(_copy_all, pairs)
        return self._pool.submit(_copy_all, list(pairs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadStager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CudaStager:
    """Copies device tensors on a side CUDA stream into pinned buffers.

    The side stream first waits for the compute stream, so the copy sees
    finished values; each source is marked as used by the side stream so its
    memory is not reused mid-copy. A thread waits on the recorded event and
    completes the future. CPU sources in the same call are copied inline.
    """

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="ckptd-cuda-stage")
        self._lock = threading.Lock()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            idx = device.index if device.index is not None else torch.cuda.current_device()
            if idx not in self._streams:
                self._streams[idx] = torch.cuda.Stream(device=idx)
            return self._streams[idx]

    def copy(self, pairs: Sequence[Pair], *, wait: bool) -> Future[None]:
        cpu = [(s, d) for s, d in pairs if not s.is_cuda]
        events = []
        with torch.no_grad():
            for src, dst in pairs:
                if not src.is_cuda:
                    continue
                stream = self._stream(src.device)
                stream.wait_stream(torch.cuda.current_stream(src.device))
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(stream)
            for stream in self._streams.values():
                ev = torch.cuda.Event()
                ev.record(stream)
                events.append(ev)
        if wait:
            _copy_all(cpu)
            for ev in events:
                ev.synchronize()
            return _run_now(lambda: None)
        return self._waiter.submit(_finish, cpu, events)

    def close(self) -> None:
        self._waiter.shutdown(wait=True)

    def __enter__(self) -> CudaStager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finish(cpu: Sequence[Pair], events: list) -> None:
    _copy_all(cpu)
    for ev in events:
        ev.synchronize()


def _run_now(fn, *args) -> Future[None]:
    fut: Future[None] = Future()
    try:
        fn(*args)
    except BaseException as e:  # delivered through the future, like background work
        fut.set_exception(e)
    else:
        fut.set_result(None)
    return fut


def make_stager() -> Stager:
    """CudaStager when CUDA is present, else ThreadStager."""
    return CudaStager() if torch.cuda.is_available() else ThreadStager()
