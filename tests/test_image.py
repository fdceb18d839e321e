"""The file-image write path: records torch.load and zip tools accept, O_DIRECT or buffered, one pass."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import zipfile
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _trainer import assert_tree_equal
from torch import nn

import ckptd
from ckptd.errors import SnapshotError
from ckptd.snapshot.direct import BUFFERED, DIRECT, DirectWriter, Segment
from ckptd.snapshot.image import ALIGN, Templates, make_template, plan
from ckptd.snapshot.stage import FileImage, HostPool
from ckptd.store.checksum import file_checksum


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((3, 4), torch.float32),
        ((), torch.int64),
        ((0,), torch.float32),
        ((7,), torch.bfloat16),
        ((5,), torch.bool),
        ((600, 700), torch.float16),
    ],
)
def test_template_plus_data_is_the_record_torch_save_writes(shape, dtype):
    t = make_template(shape, dtype)
    x = (torch.randn(shape) * 10).to(dtype)
    data = x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
    suffix = bytearray(t.suffix)
    for at in t.crc_at:
        struct.pack_into("<I", suffix, at, zlib.crc32(data))
    record = t.prefix + data + bytes(suffix)
    ref = io.BytesIO()
    torch.save(x, ref)
    assert len(record) == len(ref.getvalue()) == t.length
    assert torch.equal(torch.load(io.BytesIO(record), weights_only=True), x)
    assert zipfile.ZipFile(io.BytesIO(record)).testzip() is None  # every CRC in the zip is right


def test_layout_puts_large_tensors_on_4k_and_pool_views_at_their_offsets():
    layout = plan(
        [("a", (5,), torch.float32), ("b", (512, 1024), torch.float32), ("c", (3,), torch.int64)], Templates()
    )
    big = layout.by_fqn["b"]
    assert big.data % ALIGN == 0 and layout.size % ALIGN == 0
    img = FileImage(layout, pin=False)
    img.tensors["b"].fill_(2.5)
    raw = bytes(img.view[big.offset : big.offset + big.length])
    assert raw[: len(big.template.prefix)] == big.template.prefix
    assert torch.equal(
        torch.frombuffer(bytearray(raw[big.data - big.offset :][: big.nbytes]), dtype=torch.float32),
        torch.full((512 * 1024,), 2.5),
    )
    img.close()


def _segments(img: FileImage) -> list[Segment]:
    return [Segment(0, img.view[: img.layout.size])]


@pytest.mark.parametrize("direct", [True, False])
def test_writer_checksum_in_the_same_pass_equals_a_read_back(tmp_path, direct):
    img = FileImage(plan([("w", (1000, 3000), torch.float32), ("b", (17,), torch.float64)], Templates()), pin=False)
    img.tensors["w"].normal_()
    img.tensors["b"].normal_()
    size = max(p.offset + p.length for p in img.layout.placed)
    with DirectWriter(direct=direct) as w:
        out = w.write(str(tmp_path / "f"), _segments(img), size, algo="crc32")
    assert out.io == (DIRECT if direct else BUFFERED)
    assert os.path.getsize(tmp_path / "f") == size
    assert file_checksum(str(tmp_path / "f"), "crc32") == (out.checksum, size)


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount: a real file system that refuses O_DIRECT (EINVAL at open)."""
    mnt = tmp_path / "ram"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)]).returncode != 0:
        pytest.skip("mounting ramfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.Linear(512, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    return model, opt


def test_a_file_system_refusing_o_direct_gets_buffered_writes_and_says_so(ramfs, caplog):
    from ckptd.snapshot.flatten import Leaf, flatten
    from ckptd.snapshot.write import Ranks, write_snapshot
    from ckptd.store.file import FileStore

    model, opt = make()
    store = FileStore(str(ramfs / "store"))  # ramfs reports no free space, so the hook's make_room is bypassed
    pool = HostPool(pin=False)
    with DirectWriter() as writer:
        for step in (0, 1):
            leaves = flatten({"model": model.state_dict(), "optimizer": opt.state_dict()})
            bufs = pool.buffers_for({x.fqn: x.value for x in leaves if isinstance(x.value, torch.Tensor)}, step=step)
            for x in leaves:
                if x.fqn in bufs:
                    bufs[x.fqn].copy_(x.value)
            staged = [Leaf(x.fqn, x.path, bufs.get(x.fqn, x.value)) for x in leaves]
            write_snapshot(store, step, staged, Ranks(), metrics={}, meta={}, image=pool.image, writer=writer)
    refusals = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refusals) == 1, "one clear message, not one per snapshot"
    for step in (0, 1):
        man = json.loads(open(os.path.join(store.root, f"step-{step:012d}", "ckptd.json")).read())
        assert man["meta"]["io"] == BUFFERED
    assert_tree_equal(ckptd.load(store.root)["model"], model.state_dict())
    pool.close()


def test_snapshot_from_the_image_is_o_direct_valid_zip_and_dcp_loadable(tmp_path):
    model, opt = make()
    with ckptd.Checkpointer(str(tmp_path), model=model, optimizer=opt, policy="every:1000") as ck:
        ck.save(3).durable.result(timeout=60)
    step = tmp_path / "step-000000000003"
    man = json.loads((step / "ckptd.json").read_bytes())
    assert man["meta"]["io"] == DIRECT
    raw = (step / "__0_0.distcp").read_bytes()
    tensors = [i for i in man["items"] if i["kind"] == "tensor"]
    assert tensors and all(i["data_offset"] > i["offset"] for i in tensors)
    for item in tensors:
        record = raw[item["offset"] : item["offset"] + item["length"]]
        assert zipfile.ZipFile(io.BytesIO(record)).testzip() is None, item["fqn"]
    fresh, fresh_opt = make(seed=9)
    sd = {"model": fresh.state_dict()}
    dcp.load(sd, checkpoint_id=str(step))
    assert_tree_equal(sd["model"], model.state_dict())


def test_pool_is_reused_while_shapes_stay_and_laid_out_again_when_they_change():
    pool = HostPool(pin=False)
    a = {"x": torch.zeros(4, 4), "y": torch.zeros(3)}
    first = pool.buffers_for(a, step=0)
    image = pool.image
    assert pool.buffers_for(a, step=1)["x"].data_ptr() == first["x"].data_ptr() and pool.image is image
    pool.buffers_for({"x": torch.zeros(8, 4), "y": torch.zeros(3)}, step=2)
    assert pool.image is not image and pool.image.tensors["x"].shape == (8, 4)
    pool.close()


def test_pool_prepared_in_the_background_is_the_one_the_snapshot_uses():
    pool = HostPool(pin=False)
    specs = {"x": torch.zeros(256, 1024)}
    pool.prepare(specs).result(timeout=30)
    image = pool.image
    assert image is not None
    pool.buffers_for(specs, step=0)
    assert pool.image is image
    pool.close()


def test_closing_a_pool_still_being_laid_out_waits_for_it_and_frees_it():
    """The layout thread must not outlive close(): killed inside torch at exit, it aborts the process."""
    import threading

    pool = HostPool(pin=False)
    fut = pool.prepare({f"w{i}": torch.zeros(i + 1) for i in range(3000)})  # 3000 record headers to make
    pool.close()
    assert fut.done() and pool.image is None
    assert not [t for t in threading.enumerate() if t.name == "ckptd-pool"]


@pytest.fixture
def tiny_tmpfs(small_tmpfs):
    return small_tmpfs("1m")


def test_full_disk_is_one_clear_error_and_leaves_no_file(tiny_tmpfs):
    img = FileImage(plan([("w", (1024, 1024), torch.float32)], Templates()), pin=False)
    with DirectWriter() as w:
        with pytest.raises(
            SnapshotError,
            match=r"no space left .*\(needs 4\.0 MiB, [0-9.]+ MiB free\): the local tier is full; free space",
        ):
            w.write(str(tiny_tmpfs / "f"), _segments(img), img.layout.size, algo="crc32")
    assert os.listdir(tiny_tmpfs) == []


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_load_reads_each_file_once_and_tensors_own_their_memory(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024))  # 16 MiB of weights, 48 with AdamW
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    with ckptd.Checkpointer(str(tmp_path), model=model, optimizer=opt, policy="every:1000") as ck:
        ck.save(0).durable.result(timeout=60)
    size = sum(f.stat().st_size for f in (tmp_path / "step-000000000000").iterdir())
    before = _rchar()
    state = ckptd.load(str(tmp_path))
    read = _rchar() - before
    assert 0.9 * size <= read < 1.5 * size, f"read {read} bytes for a {size}-byte snapshot: files were read twice"
    w = state["optimizer"]["state"][0]["exp_avg"]
    assert_tree_equal(state["model"], model.state_dict())
    assert w.untyped_storage().nbytes() == w.nbytes, "a loaded tensor must not be a view of the whole file"


def test_checkpointer_restore_reads_each_file_once(tmp_path):
    model, opt = make()
    with ckptd.Checkpointer(str(tmp_path), model=model, optimizer=opt, policy="every:1000") as ck:
        ck.save(0).durable.result(timeout=60)
    size = sum(f.stat().st_size for f in (tmp_path / "step-000000000000").iterdir())
    m2, o2 = make(seed=4)
    with ckptd.Checkpointer(str(tmp_path), model=m2, optimizer=o2, policy="every:1000") as ck:
        before = _rchar()
        assert ck.restore() == 1
        read = _rchar() - before
    assert read < 1.5 * size + (1 << 16), f"read {read} bytes for a {size}-byte snapshot"
    assert_tree_equal(m2.state_dict(), model.state_dict())
    assert_tree_equal(o2.state_dict(), opt.state_dict())


def test_a_file_changed_after_verification_is_caught_by_the_load_itself(tmp_path):
    from ckptd.errors import SnapshotCorrupt
    from ckptd.restore.find import read_manifest
    from ckptd.restore.load import read_state
    from ckptd.store.file import FileStore

    model, opt = make()
    with ckptd.Checkpointer(str(tmp_path), model=model, optimizer=opt, policy="every:1000") as ck:
        ck.save(0).durable.result(timeout=60)
    manifest = read_manifest(FileStore(str(tmp_path)), 0)
    path = tmp_path / "step-000000000000" / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="does not match the manifest"):
        read_state(str(tmp_path / "step-000000000000"), manifest)


def test_snapshots_written_through_dcp_still_restore(tmp_path):
    from ckptd.snapshot.flatten import flatten
    from ckptd.snapshot.write import Ranks, write_snapshot
    from ckptd.store.file import FileStore

    model, opt = make()
    leaves = flatten({"model": model.state_dict(), "optimizer": opt.state_dict()})
    write_snapshot(FileStore(str(tmp_path)), 2, leaves, Ranks(), metrics={}, meta={})  # no image: DCP's writer
    man = json.loads((tmp_path / "step-000000000002" / "ckptd.json").read_bytes())
    assert man["meta"]["io"] == "dcp" and all(i.get("data_offset", -1) == -1 for i in man["items"])
    state = ckptd.load(str(tmp_path))
    assert_tree_equal(state["model"], model.state_dict())
    assert_tree_equal(state["optimizer"], opt.state_dict())
