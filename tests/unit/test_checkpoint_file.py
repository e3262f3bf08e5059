"""Checkpoint files (hpcngd.checkpoint): atomic writes, pruning, and refusal of bad files. No MPI."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcngd import checkpoint
from hpcngd.checkpoint import CorruptCheckpoint, Reader, Writer
from hpcngd.errors import CheckpointError, UserError
from hpcngd.metrics import MetricsLog, RunClock, duration

PATTERN = np.full(4096, 12345.678, dtype=np.float64)


def write(folder: Path, step: int, keep_last: int = 5) -> Path:
    w = Writer(folder, step, {"run_file": "[run]\n", "epoch": 1})
    w.put("model/w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.put("model/count", np.array(7, dtype=np.int64))  # 0-d
    w.put("model/empty", np.zeros((0, 3), dtype=np.float32))
    w.put("model/flags", np.array([True, False]))
    w.put("data/pattern", PATTERN)
    w.create("data/rows", (4, 2), np.float32)
    w.fill("data/rows", 0, np.ones((2, 2), np.float32))
    w.fill("data/rows", 2, np.full((2, 2), 2.0, np.float32))
    w.set_attrs("ngd/l/A", interval=4, next_step=9)
    w.put_stacked("ranks/state", [np.full(5, r, np.uint32) for r in range(3)])
    return w.commit(keep_last)


def test_round_trip_and_latest_pointer(tmp_path: Path) -> None:
    path = write(tmp_path, 12)
    assert path.name == "ckpt-000000012.h5"
    assert (tmp_path / "latest").read_text() == "ckpt-000000012.h5\n"
    assert not list(tmp_path.glob(".*tmp"))
    with Reader(path) as r:
        r.verify()
        assert r.step == 12 and r.attrs["epoch"] == 1 and r.attrs["run_file"] == "[run]\n"
        np.testing.assert_array_equal(r.array("model/w"), np.arange(12, dtype=np.float32).reshape(3, 4))
        assert r.array("model/count") == 7 and r.array("model/count").dtype == np.int64
        assert r.array("model/empty").shape == (0, 3)
        assert r.array("model/flags").tolist() == [True, False]
        assert r.rows("data/rows", 1, 3).tolist() == [[1, 1], [2, 2]]
        assert r.group_attrs("ngd/l/A") == {"interval": 4, "next_step": 9}
        assert r.array("ranks/state").tolist() == [[0] * 5, [1] * 5, [2] * 5]
        assert sorted(r.names("model")) == ["model/count", "model/empty", "model/flags", "model/w"]


def test_keep_last_prunes_only_older_after_the_new_one_is_complete(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        write(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.candidates(tmp_path)] == ["ckpt-000000008.h5", "ckpt-000000006.h5"]


def test_an_unfinished_write_leaves_earlier_checkpoints_and_is_removed_when_a_run_starts(
    tmp_path: Path,
) -> None:
    write(tmp_path, 2)
    w = Writer(tmp_path, 4, {})
    w.put("model/w", np.ones(3, np.float32))
    w.file.flush()  # the writer dies here: no commit
    assert [p.name for p in checkpoint.candidates(tmp_path)] == ["ckpt-000000002.h5"]
    assert (tmp_path / "latest").read_text() == "ckpt-000000002.h5\n"
    (left,) = tmp_path.glob(".ckpt-000000004.h5.*.tmp")
    w.file.close()
    write(tmp_path, 6)  # other writers leave it alone: it may be a live writer's
    earlier = tmp_path / ".ckpt-000000008.h5.tmp"  # an earlier hpcngd's name
    earlier.write_bytes(b"x")
    assert left.exists()
    assert checkpoint.remove_leftovers(tmp_path) == [left, earlier]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000002.h5", "ckpt-000000006.h5", "latest"]


def test_a_writer_whose_folder_was_taken_over_publishes_nothing_and_spares_the_new_writer(
    tmp_path: Path,
) -> None:
    """A run suspended mid-write resumes after another run took its folder over: both write the same
    step at once. The old one must neither publish, prune nor touch the new one's file."""
    for step in (2, 4):
        write(tmp_path, step, keep_last=2)
    old = Writer(tmp_path, 6, {"who": "old"})
    old.put("model/w", np.zeros(3, np.float32))
    new = Writer(tmp_path, 6, {"who": "new"})
    new.put("model/w", np.ones(3, np.float32))
    assert old.tmp != new.tmp and old.tmp.exists() and new.tmp.exists()
    asked: list[bool] = []
    with pytest.raises(checkpoint.NotPublished, match=r"ckpt-000000006\.h5 not published: the folder is"):
        old.commit(1, lambda: asked.append(True) or False)
    assert asked == [True] and not old.tmp.exists() and new.tmp.exists()
    names = ["ckpt-000000004.h5", "ckpt-000000002.h5"]
    assert [p.name for p in checkpoint.candidates(tmp_path)] == names  # nothing pruned
    assert (tmp_path / "latest").read_text() == "ckpt-000000004.h5\n"
    assert new.commit(2, lambda: True).name == "ckpt-000000006.h5"
    with Reader(tmp_path / "ckpt-000000006.h5") as r:
        assert r.attrs["who"] == "new" and r.array("model/w").tolist() == [1, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000004.h5", "ckpt-000000006.h5", "latest"]


def test_a_writer_that_stalls_after_its_rename_while_its_folder_is_taken_over_unpublishes_or_spares(
    tmp_path: Path,
) -> None:
    """The lock is asked again after the rename (a stall in the directory's sync: a suspended job, a
    slow NFS server) and before pruning: the new run's ``latest`` and checkpoints stay as they were."""
    for step in (2, 4):
        write(tmp_path, step, keep_last=2)
    answers = iter([True, False])
    w = Writer(tmp_path, 6, {"who": "old"})
    with pytest.raises(checkpoint.NotPublished):
        w.commit(1, lambda: next(answers))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000002.h5", "ckpt-000000004.h5", "latest"]
    assert (tmp_path / "latest").read_text() == "ckpt-000000004.h5\n"
    answers = iter([True, True, False])  # taken over once latest moved: nothing pruned
    with pytest.raises(checkpoint.NotPublished):
        Writer(tmp_path, 6, {"who": "old"}).commit(1, lambda: next(answers))
    names = ["ckpt-000000002.h5", "ckpt-000000004.h5", "ckpt-000000006.h5", "latest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_a_write_that_fails_raises_and_keeps_the_previous(tmp_path: Path) -> None:
    write(tmp_path, 2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    w = Writer(blocker / "sub", 4, {})  # its folder cannot be created
    w.put("model/w", np.ones(3, np.float32))
    assert w.error is not None
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        w.commit(1)
    assert [p.name for p in checkpoint.candidates(tmp_path)] == ["ckpt-000000002.h5"]


def test_rows_of_unequal_shapes_fail_the_write_at_commit(tmp_path: Path) -> None:
    write(tmp_path, 2)
    w = Writer(tmp_path, 4, {})
    w.put_stacked("ranks/state", [np.zeros(5, np.uint32), np.zeros(4, np.uint32)])
    w.put("model/w", np.ones(3, np.float32))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*ckpt-000000004\.h5: ValueError"):
        w.commit(1)
    assert [p.name for p in checkpoint.candidates(tmp_path)] == ["ckpt-000000002.h5"]


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    path = write(tmp_path, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    sizes = f"{len(data) // 2 - checkpoint.USER_BLOCK:,} bytes, {len(data) - checkpoint.USER_BLOCK:,} written"
    with pytest.raises(CorruptCheckpoint, match=f"{path}: truncated or extended: {sizes}"):
        Reader(path)


def unsealed(path: Path) -> Path:
    """``path`` as an earlier hpcngd wrote it: HDF5 from the first byte (HDF5 addresses are relative to
    its superblock, so the file without its user block is the same HDF5 file)."""
    data = path.read_bytes()
    assert data[checkpoint.USER_BLOCK :].startswith(checkpoint.HDF5_SIGNATURE)
    path.write_bytes(data[checkpoint.USER_BLOCK :])
    return path


def test_any_flipped_bit_is_found_before_hdf5_reads_the_file(tmp_path: Path) -> None:
    """Every bit counts: HDF5's header (one flip there made HDF5 loop forever) and the seal itself (a
    damaged seal must not pass the file, maybe damaged elsewhere too, to HDF5 unchecked)."""
    path = write(tmp_path, 2)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    block = checkpoint.USER_BLOCK
    # the seal's first byte, a digest digit, its newline and padding, 10 more bytes of the seal; HDF5's
    # first byte, the byte whose flip hung HDF5 (offset 2072 of HDF5's bytes), and 40 more anywhere
    newline = data.index(b"\n")
    in_seal = [0, 30, newline, newline + 1, block - 1, *rng.integers(0, block, 10)]
    offsets = [*in_seal, block, block + 2072, *rng.integers(block, len(data), 40)]
    for at in offsets:
        for bit in range(8):
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            with pytest.raises(CorruptCheckpoint, match=str(path)) as info:
                Reader(path)
            if at >= block:
                assert "damaged since it was written" in str(info.value)
    path.write_bytes(data)
    with Reader(path) as r:
        assert r.sealed and r.array("model/count") == 7


def test_a_file_that_fails_to_seal_is_not_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 2)

    def disk_error(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint, "seal", disk_error)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*ckpt-000000004\.h5: OSError"):
        write(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000002.h5", "latest"]


def test_unsealed_file_is_read_and_a_flipped_byte_fails_its_checksum(tmp_path: Path) -> None:
    path = unsealed(write(tmp_path, 2))
    with Reader(path) as r:
        assert not r.sealed
        r.verify()
    assert "no SHA-256 seal" in checkpoint.describe(path)
    data = bytearray(path.read_bytes())
    at = data.find(PATTERN[:2].tobytes()) + 100
    assert at > 100
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    with Reader(path) as r, pytest.raises(CorruptCheckpoint, match="data/pattern"):
        r.verify()


def test_missing_file_wrong_format_and_schema(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        Reader(tmp_path / "nope.h5")
    with pytest.raises(CheckpointError, match=r"a folder; name a ckpt-\*\.h5 file in it"):
        Reader(tmp_path)  # `hpcngd inspect out/run/checkpoints`
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.ones(2)
    with pytest.raises(CheckpointError, match="not an hpcngd checkpoint"):
        Reader(other)
    path = write(tmp_path, 2)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    checkpoint.seal(path)  # as another hpcngd version would have written it
    with pytest.raises(CheckpointError, match="schema version 99; this hpcngd reads versions 1 to 3") as info:
        Reader(path)
    assert not isinstance(info.value, CorruptCheckpoint)  # resume = auto does not skip it


@pytest.mark.parametrize("error", [OSError, KeyError, ValueError, RuntimeError, SystemError])
def test_any_error_of_h5py_reading_a_damaged_file_marks_it_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    """Which exception h5py raises for damaged metadata depends on what is damaged: flipping bits of a
    checkpoint's header found KeyError, RuntimeError and SystemError besides OSError. Each marks the file
    corrupt (resume = auto sets it aside and takes the previous one) wherever the reader meets it."""
    path = write(tmp_path, 2)

    def damaged(*args: object, **kwargs: object) -> None:
        raise error("damaged metadata")

    for cls, method in ((h5py.AttributeManager, "get"), (h5py.Group, "visititems_links")):
        with monkeypatch.context() as m, pytest.raises(CorruptCheckpoint, match=str(path)):
            m.setattr(cls, method, damaged)
            Reader(path)
    with Reader(path) as r:
        reads = {
            "visititems": lambda: r.names("model"),
            "__contains__": lambda: r.has("model/w"),
            "__getitem__": lambda: r.array("model/w"),
        }
        for method, read in reads.items():
            with monkeypatch.context() as m, pytest.raises(CorruptCheckpoint, match=str(path)):
                m.setattr(h5py.Group, method, damaged)
                read()
        with monkeypatch.context() as m, pytest.raises(CorruptCheckpoint, match="ngd/l/A"):
            m.setattr(h5py.AttributeManager, "items", damaged)
            r.group_attrs("ngd/l/A")


@pytest.mark.parametrize(
    "kind", ["opaque", "object", "string", "attribute", "softlink", "external", "external-data", "filter"]
)
def test_entries_that_are_not_numbers_are_refused_unread(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, 2)
    payload = pickle.dumps({"evil": True})
    with h5py.File(path, "a") as f:
        if kind == "opaque":
            f["model/pickled"] = np.void(payload)
        elif kind == "object":
            ragged = np.empty(1, dtype=object)
            ragged[0] = np.frombuffer(payload, np.uint8)
            f.create_dataset("model/pickled", data=ragged, dtype=h5py.vlen_dtype(np.uint8))
        elif kind == "string":
            f["model/pickled"] = payload.hex()
        elif kind == "attribute":
            f["model/w"].attrs["pickled"] = np.void(payload)
        elif kind == "external-data":  # its bytes would come from another file
            (tmp_path / "secret.bin").write_bytes(bytes(16))
            f.create_dataset(
                "model/outside", shape=(4,), dtype="f4", external=[(str(tmp_path / "secret.bin"), 0, 16)]
            )
        elif kind == "filter":
            f.create_dataset("model/packed", data=np.ones(100), compression="gzip")
        elif kind == "softlink":
            f["model/link"] = h5py.SoftLink("/model/w")
        else:
            f["model/link"] = h5py.ExternalLink("elsewhere.h5", "/x")
    checkpoint.seal(path)  # the seal finds damage, not intent: the content check must hold on its own
    with pytest.raises(CheckpointError, match="refusing to load"):
        Reader(path)


def test_describe(tmp_path: Path) -> None:
    text = checkpoint.describe(write(tmp_path, 12))
    assert "step 12" in text and "model" in text and "data" in text and "[run]" in text
    assert "SHA-256 checked" in text
    assert "clock" not in text  # a header without the run's clock (an older hpcngd)


def test_describe_says_how_long_the_run_trained_and_when_it_reached_its_target(tmp_path: Path) -> None:
    clock = {"train_s": 330.0, "elapsed_s": 8000.0}
    w = Writer(tmp_path, 12, {"run_file": "[run]\n", **clock, "target_top1": 75.4, "target_step": 9})
    w.put("model/w", np.zeros(3, np.float32))
    lines = checkpoint.describe(w.commit(1)).splitlines()
    reached = "; target top1 75.4% reached at step 9"
    assert lines[2] == "clock: 5.5 min of training, 2.22 h with evaluations and checkpoints" + reached
    w = Writer(tmp_path, 13, {"run_file": "[run]\n", **clock, "target_top1": 75.4, "target_step": -1})
    w.put("model/w", np.zeros(3, np.float32))
    assert checkpoint.describe(w.commit(1)).splitlines()[2] == (
        "clock: 5.5 min of training, 2.22 h with evaluations and checkpoints"
    )


def test_the_run_clock_sums_steps_and_the_loop_over_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = RunClock()
    assert clock.fields() == {"train_s": 0.0, "elapsed_s": 0.0}  # not started: set-up is not counted
    clock.load(10.0, 12.5)  # from a checkpoint
    now[0] = 150.0  # restoring took 50 s
    clock.start()
    clock.add_step(2.0)
    now[0] = 153.25  # a step of 2 s, then 1.25 s of evaluation
    assert clock.fields() == {"train_s": 12.0, "elapsed_s": 15.75}
    assert [duration(s) for s in (0.04, 119.96, 120.0, 7199.0, 7200.0)] == [
        "0.0 s", "120.0 s", "2.0 min", "120.0 min", "2.00 h"
    ]  # fmt: skip


def test_metrics_log_resume_drops_later_records_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, active=True)
    for step in (1, 2, 3, 4):
        log.record(kind="train", step=step)
    log.close()
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a line torn by a crash
    log = MetricsLog(path, active=True)
    log.open(resume_step=2)
    log.record(kind="train", step=3, again=True)
    log.close()
    log.record(kind="train", step=99)  # after close: nothing
    assert timeless(path) == [
        {"kind": "train", "step": 1},
        {"kind": "train", "step": 2},
        {"kind": "train", "step": 3, "again": True},
    ]


def test_metrics_log_resume_keeps_what_was_written_up_to_the_checkpoint_s_record(tmp_path: Path) -> None:
    """After a resume with another global batch (step 4 of batch 20 became step 2 of batch 40), step
    numbers repeat: a later resume keeps the records up to its checkpoint's record, not by step."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, active=True)
    written = [
        {"kind": "train", "step": 2},
        {"kind": "eval", "step": 4},
        {"kind": "checkpoint", "step": 4, "path": "out/r/checkpoints/ckpt-000000004.h5"},
        {"kind": "train", "step": 3},  # batch 40 from here
        {"kind": "checkpoint", "step": 3, "path": "/abs/out/r/checkpoints/ckpt-000000003.h5"},
        {"kind": "train", "step": 4},  # after that checkpoint: dropped
    ]
    for rec in written:
        log.record(**rec)
    log.close()
    log = MetricsLog(path, active=True)
    log.open(3, "ckpt-000000003.h5")
    log.close()
    assert timeless(path) == written[:5]  # by step (<= 3) it dropped the eval and checkpoint of step 4
    log = MetricsLog(path, active=True)
    log.open(2, "ckpt-000000002.h5")  # no record of it (a crash right after its write): by step
    log.close()
    assert timeless(path) == [written[0]]


def timeless(path: Path) -> list[dict[str, object]]:
    """The records of metrics file ``path`` without their ``time``, which each must hold (Unix seconds,
    written within the last minute)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(time.time() - 60 < r.pop("time") < time.time() + 1 for r in records), records
    return records


def test_a_run_that_lost_its_directory_writes_no_record_into_the_new_runs_metrics(tmp_path: Path) -> None:
    """A suspended run whose directory was taken over may finish its step and append one record through
    its open handle: it must land in its own (now unlinked) file, whether the new run starts fresh or
    resumes, never in the new run's file (truncated in place, it got a hole of NUL bytes and the record)."""
    path = tmp_path / "metrics.jsonl"
    for resume_step in (None, 1):
        path.unlink(missing_ok=True)
        old = MetricsLog(path, active=True)
        for step in (1, 2, 3):
            old.record(kind="train", step=step, run="old")
        new = MetricsLog(path, active=True)
        new.open(resume_step=resume_step)
        new.record(kind="train", step=2, run="new")
        old.record(kind="train", step=4, run="old")  # the stray record
        old.close()
        new.close()
        kept = [{"kind": "train", "step": 1, "run": "old"}] if resume_step else []
        assert "\0" not in path.read_text()
        assert timeless(path) == [*kept, {"kind": "train", "step": 2, "run": "new"}]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_metrics_log_on_a_full_disk_is_one_line_naming_the_file() -> None:
    log = MetricsLog(Path("/dev/full"), active=True)  # opens; every write fails with ENOSPC
    with pytest.raises(UserError, match=r"^cannot write /dev/full: No space left on device$"):
        log.record(kind="train", step=1)
    with pytest.raises(UserError, match="cannot write /dev/full"):  # the unwritten line, at close
        log.close()
    log.record(kind="train", step=2)  # closed: nothing written, nothing raised


def test_resume_order_follows_latest_not_the_highest_step(tmp_path: Path) -> None:
    for step in (2, 4):
        write(tmp_path, step)
    assert [p.name for p in checkpoint.resume_order(tmp_path)] == ["ckpt-000000004.h5", "ckpt-000000002.h5"]
    write(tmp_path, 3)  # a run resumed from an older checkpoint (or another batch size) went on from there
    order = [p.name for p in checkpoint.resume_order(tmp_path)]
    assert order == ["ckpt-000000003.h5", "ckpt-000000004.h5", "ckpt-000000002.h5"]
    (tmp_path / "latest").unlink()
    assert checkpoint.resume_order(tmp_path)[0].name == "ckpt-000000004.h5"


def test_a_resume_continues_where_the_images_trained_on_end() -> None:
    """The step to resume at, from a checkpoint's header: the same step, unless the global batch or the
    training set changed or the file is from an hpcngd whose epochs were N // B steps (schema 1, 2)."""
    import sys

    from mpi4py import MPI

    from hpcngd.state import _resume_step

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
    from runs import make_trainer

    with make_trainer(MPI.COMM_SELF, []) as t:  # 56 images, batch 16: 3.5 steps an epoch, 14 steps
        v3 = {"schema_version": 3, "train_samples": 56}
        v2 = {"schema_version": 2, "epoch": 2, "step_in_epoch": 0}
        cases = [
            ({**v3, "step": 5, "batch_size": 16}, 5, []),
            (
                {**v3, "step": 5, "batch_size": 8},
                2,
                [
                    "global batch changed (8 -> 16): 40 images trained on, resuming at step 2 (epoch "
                    "0.57); the last 8 of them are trained on again"
                ],
            ),
            (
                {**v3, "step": 5, "batch_size": 16, "train_samples": 60},
                5,
                [
                    "training set size changed (60 -> 56 images): step 5 is epoch 1.43 now, and the "
                    "sample order from here on is not the one before"
                ],
            ),
            (
                {**v2, "step": 6, "batch_size": 16, "steps_per_epoch": 3},
                6,
                [
                    "written by an hpcngd whose epochs were N // batch steps (3), leaving the last N mod "
                    "batch images out: step 6 was epoch 2.00 then; resuming at step 6, epoch 1.71 now, of a "
                    "run of 14 steps"
                ],
            ),
            (
                {**v2, "step": 8, "batch_size": 8, "steps_per_epoch": 8},  # 64 images then
                4,
                [
                    "global batch changed (8 -> 16): 64 images trained on, resuming at step 4 (epoch 1.14)",
                    "written by an hpcngd whose epochs were N // batch steps (8), leaving the last N mod "
                    "batch images out: step 8 was epoch 1.00 then; resuming at step 4, epoch 1.14 now, of a "
                    "run of 14 steps (the training set changed: 56 images now)",
                ],
            ),
            (
                {**v2, "step": 7, "batch_size": 8, "steps_per_epoch": 7},
                3,
                [
                    "global batch changed (8 -> 16): 56 images trained on, resuming at step 3 (epoch 0.86); "
                    "the last 8 of them are trained on again"
                ],
            ),  # 56 = 7 x 8: no image was left out then
        ]
        for header, step, notes in cases:
            got: list[str] = []
            assert (_resume_step(t, header, got), got) == (step, notes)


def test_a_resume_continues_the_run_s_clock_and_finds_its_time_to_target_in_its_evaluations() -> None:
    import sys

    from mpi4py import MPI

    from hpcngd.state import _restore_clock

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
    from runs import make_trainer

    header = {"train_s": 30.5, "elapsed_s": 42.25, "target_top1": 50.0}
    evals = [(3.0, 1.0, 40.0, 10.0, 12.0), (7.0, 2.0, 55.0, 21.5, 25.0), (9.0, 3.0, 65.0, 28.0, 33.5)]
    for target, reached, note in [
        (50.0, 7, ""),  # reported before: not again
        (60.0, 9, "log.target_top1 = 60 was reached before this resume, at step 9 (epoch 3) after 28.0 s of "
         "training, 33.5 s with evaluations and checkpoints (no target record is written for it)"),
        (70.0, -1, ""),  # not yet: timed from here on
    ]:  # fmt: skip
        with make_trainer(MPI.COMM_SELF, [f"log.target_top1={target}"]) as t:
            notes: list[str] = []
            _restore_clock(t, header, list(evals), notes)
            assert t.clock.fields() == {"train_s": 30.5, "elapsed_s": 42.25}
            assert (t.evals, t.target_step, notes) == (evals, reached, [note] if note else [])
    with make_trainer(MPI.COMM_SELF, ["log.target_top1=50"]) as t:  # written by an older hpcngd
        _restore_clock(t, {"step": 3}, [], notes)
        assert (t.clock.train_s, t.target_step) == (0.0, -1)
        assert notes == [
            "the checkpoint holds no training clock: train_s and elapsed_s count from this resume"
        ]
