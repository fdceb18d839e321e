"""The one-read restore: in place, and checked against the bytes it reads.

A manifest forged with its digest recomputed still passes the checksums
(they cover the data files, which are untouched); each image record's
header, the dtype and shape ``torch.save`` wrote, is what catches it.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from _trainer import assert_tree_equal
from test_hostile_store import STEP3, _rewrite_manifest, cli
from test_snapshot import ckpt_for, make, run

import ckptd
from ckptd.errors import NoGoodSnapshot, SnapshotCorrupt


def _first_image_tensor(raw, dtype="float32", dims=2):
    return next(
        i
        for i in raw["items"]
        if i["kind"] == "tensor" and i.get("data_offset", -1) >= 0 and i["dtype"] == dtype and len(i["shape"]) == dims
    )


def _forge(store, change) -> None:
    _rewrite_manifest(os.path.join(store, STEP3, "ckptd.json"), lambda raw: change(_first_image_tensor(raw)))


def _same_width_dtype(item):
    item["dtype"] = "int32"


def _same_numel_shape(item):
    rows, cols = item["shape"]
    item["shape"] = item["chunk_sizes"] = [cols, rows] if rows != cols else [rows * cols, 1]


@pytest.mark.parametrize("change", [_same_width_dtype, _same_numel_shape], ids=["dtype", "shape"])
def test_a_manifest_lying_about_a_tensor_is_caught_by_its_record_header(tmp_path, change):
    store = str(tmp_path / "store")
    run(store, 4)  # steps 1 and 3
    _forge(store, change)
    assert "step 3: ok" in cli("verify", store, "--all").stdout, "the checksums still pass"
    with pytest.raises(SnapshotCorrupt, match="the manifest does not describe the data"):
        ckptd.load(store, step=3)
    with pytest.warns(UserWarning, match=f"skipping {STEP3}.*manifest says"):
        assert ckptd.load(store)["meta"]["step"] == 1
    model, opt, sched, counter = make(seed=5)
    with ckpt_for(store, model, opt, sched, counter) as ck:
        with pytest.warns(UserWarning, match=f"skipping {STEP3}"):
            assert ck.restore() == 2


def test_restore_reads_into_the_live_tensors_in_place(tmp_path):
    store = str(tmp_path / "store")
    saved, saved_opt, *_ = run(store, 4)
    model, opt, sched, counter = make(seed=5)
    with ckpt_for(store, model, opt, sched, counter) as ck:
        assert ck.restore() == 4  # the optimizer has no state yet: its tensors are made by the load
        params = [p.data_ptr() for p in model.parameters()] + [b.data_ptr() for b in model.buffers()]
        state = [t.data_ptr() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        assert ck.restore() == 4
        assert [p.data_ptr() for p in model.parameters()] + [b.data_ptr() for b in model.buffers()] == params
        assert [t.data_ptr() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)] == state
    assert_tree_equal(model.state_dict(), saved.state_dict())
    assert_tree_equal(opt.state_dict(), saved_opt.state_dict())


def test_a_model_that_does_not_fit_is_refused_without_touching_it(tmp_path):
    store = str(tmp_path / "store")
    run(store, 4)
    model, opt, sched, counter = make(seed=5, width=32)  # the first layer's bias and weight have other shapes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ckpt_for(store, model, opt, sched, counter) as ck:
        with pytest.raises(ckptd.IncompatibleSnapshot):
            ck.restore()
    assert_tree_equal(model.state_dict(), before)


def test_a_file_failing_its_checksum_after_reading_into_the_model_forbids_starting_over(tmp_path):
    store = str(tmp_path / "store")
    run(store, 2)  # step 1 only
    path = os.path.join(store, "step-000000000001", "__0_0.distcp")
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0x01  # late in the file: the model's tensors are read into before the checksum fails
    open(path, "wb").write(bytes(data))
    model, opt, sched, counter = make(seed=5)
    with ckpt_for(store, model, opt, sched, counter, on_bad_snapshots="start_over") as ck:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(NoGoodSnapshot, match="cannot start over"):
                ck.restore()


def _pair(seed, tied):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    if tied:
        model[1].weight = model[0].weight
    return model


def test_a_snapshot_of_untied_weights_restores_into_tied_ones_as_load_state_dict_would(tmp_path):
    """Memory two items share is read into once, the other item into a tensor of its own: reading both into it
    would break the checksum computed over it, and call a good snapshot corrupt."""
    model = _pair(0, tied=False)
    with ckptd.Checkpointer(str(tmp_path), model=model, policy="every:1000") as ck:
        ck.save(0).durable.result(timeout=60)
    restored, expected = _pair(1, tied=True), _pair(1, tied=True)
    expected.load_state_dict(model.state_dict())
    with ckptd.Checkpointer(str(tmp_path), model=restored, policy="every:1000") as ck:
        assert ck.restore() == 1
    assert restored[1].weight is restored[0].weight
    assert_tree_equal(restored.state_dict(), expected.state_dict())


def test_read_pieces_fills_each_buffer_and_checksums_the_file_in_order(tmp_path):
    from ckptd.restore.read import BATCH, Piece, read_pieces
    from ckptd.store.checksum import file_checksum

    path = tmp_path / "f"
    data = os.urandom(3 * BATCH + 12345)
    path.write_bytes(data)
    cuts = [0, 7, BATCH + 3, BATCH + 3, 2 * BATCH + 100, len(data)]  # an empty piece, pieces across batches
    bufs = [bytearray(b - a) for a, b in zip(cuts, cuts[1:])]
    pieces = [Piece(a, memoryview(buf)) for a, buf in zip(cuts, bufs)]
    assert read_pieces(str(path), pieces, size=len(data), algo="crc32") == file_checksum(str(path), "crc32")[0]
    assert b"".join(bufs) == data
    with pytest.raises(SnapshotCorrupt, match="the manifest says"):
        read_pieces(
            str(path),
            pieces[:-1] + [Piece(cuts[-2], memoryview(bytearray(len(data) + 1 - cuts[-2])))],
            size=len(data) + 1,
            algo="crc32",
        )


def test_a_manifest_pointing_two_tensors_at_the_same_bytes_is_refused(tmp_path):
    store = str(tmp_path / "store")
    run(store, 4)

    def change(raw):
        first, second = [
            i
            for i in raw["items"]
            if i["kind"] == "tensor"
            and i.get("data_offset", -1) >= 0
            and i["dtype"] == "float32"
            and i["shape"] == _first_image_tensor(raw)["shape"]
        ][:2]
        second.update(offset=first["offset"], length=first["length"], data_offset=first["data_offset"])

    _rewrite_manifest(os.path.join(store, STEP3, "ckptd.json"), change)
    with pytest.raises(SnapshotCorrupt, match="overlaps"):
        ckptd.load(store, step=3)
    with pytest.warns(UserWarning, match=f"skipping {STEP3}"):
        assert ckptd.load(store)["meta"]["step"] == 1
