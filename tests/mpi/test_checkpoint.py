"""Checkpoints across ranks: every piece of state round-trips, resumed runs continue bit for bit, a
checkpoint written by W ranks resumes on fewer, and NaN state is never saved."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcngd import state
from hpcngd.checkpoint import seal
from hpcngd.errors import AgreedError, Diverged
from hpcngd.metrics import MetricsLog
from hpcngd.train import Trainer
from runs import AUGMENT, SPNGD, flat, make_trainer

SAVE = ["checkpoint.every_steps=5", "checkpoint.keep_last=10", "log.every_steps=4"]
# 56 images / batch 16 = 3.5 steps an epoch, 4 epochs: 14 steps; epochs end in steps 4, 7, 11 and 14
# (steps 4 and 11 hold the start of the next epoch too); step 5 is in the middle of epoch 1.
CASES = {
    "sgd-mixup-erasing": AUGMENT,
    "spngd-mc-mixup-erasing": [*SPNGD, *AUGMENT, "ngd.fisher=mc"],
    # the loss scale grows every 2 good steps, so a resume must restore where it is in that count
    "spngd-fp16": [
        *SPNGD,
        "run.precision=fp16",
        "run.loss_scale_init=256",
        "run.loss_scale_growth_interval=2",
    ],
}
COMPARED = (
    "loss",
    "lr",
    "ngd_refreshed",
    "ngd_inverted",
    "loss_scale",
    "amp_skipped",
    "val_loss",
    "val_top1",
    "val_top5",
)


def run(
    comm: MPI.Comm, overrides: list[str], folder: Path, name: str, resume: str = "auto"
) -> dict[str, Any]:
    """Train RUN to the end in run directory ``folder/name``; its records, final parameters, notes."""
    overrides = [*overrides, f"run.output_dir={folder}", f"run.name={name}", f"checkpoint.resume={resume}"]
    metrics = folder / f"{name}.jsonl"
    with make_trainer(comm, overrides, MetricsLog(metrics, active=comm.rank == 0), checkpoints=True) as t:
        resumed_from, notes = state.resume(t)
        t.train()
        t.log.close()
        params = flat(t.model)
    comm.Barrier()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"records": records, "params": params, "notes": notes, "from": resumed_from}


def figures(records: list[dict[str, Any]], after: int) -> list[tuple[Any, ...]]:
    return [
        (r["kind"], r["step"], *(r.get(k) for k in COMPARED))
        for r in records
        if r["step"] > after and r["kind"] in ("train", "eval")
    ]


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_resume_continues_bit_for_bit(comm: MPI.Comm, folder: Path, overrides: list[str]) -> None:
    whole = run(comm, [*overrides, *SAVE], folder, "whole")
    ckpt = folder / "whole" / "checkpoints" / "ckpt-000000005.h5"
    resumed = run(comm, [*overrides, *SAVE], folder, "resumed", resume=str(ckpt))
    assert resumed["from"] == ckpt
    expected = figures(whole["records"], 5)
    assert [r[:2] for r in expected if r[0] == "eval"] == [("eval", 7), ("eval", 11), ("eval", 14)]
    assert figures(resumed["records"], 5) == expected
    assert torch.equal(resumed["params"], whole["params"])
    digests = comm.allgather(hashlib.sha256(resumed["params"].numpy().tobytes()).hexdigest())
    assert len(set(digests)) == 1


def snapshot(t: Trainer) -> dict[str, Any]:
    """Every piece of a trainer's state, as plain values (tensors cloned)."""
    names = {p: n for n, p in t.model.named_parameters()}
    out: dict[str, Any] = {f"model/{k}": v.clone() for k, v in t.model.state_dict().items()}
    for p, st in t.optimizer.state.items():
        out.update({f"optim/{names[p]}/{k}": v.clone() for k, v in st.items()})
    out["prev_lr"] = [g["prev_lr"] for g in t.optimizer.param_groups]
    if t.ngd is not None:
        for key, stat in t.ngd.stats.items():
            out[f"ngd/{key}"] = (stat.value, stat.inverse, stat.schedule.interval, stat.schedule.next_step)
    if t.mixup is not None:
        out["mixup"] = t.mixup.prev
    out["rng"] = (t.mc_rng.get_state(), torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    out["position"] = (t.step, list(t.pending_losses), dict(t.ngd_counts))
    out["clock"] = (t.clock.train_s, t.clock.elapsed_s, t.target_step, list(t.evals))
    return out


def assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def as_schema_1(path: Path) -> None:
    """Rewrite a checkpoint as hpcngd's schema 1 wrote it: rank R's state in group ranks/R."""
    with h5py.File(path, "r+") as f:
        for key in list(f["ranks"]):
            rows = f[f"ranks/{key}"][()]
            del f[f"ranks/{key}"]
            for r, row in enumerate(rows):
                f.create_dataset(f"ranks/{r}/{key}", data=row, fletcher32=True)
        f.attrs["schema_version"] = 1
    seal(path)


@pytest.mark.parametrize("layout", ["written", "schema-1"])
def test_every_piece_of_state_round_trips(comm: MPI.Comm, folder: Path, layout: str) -> None:
    overrides = [*SPNGD, *AUGMENT, "ngd.fisher=mc", *SAVE, f"run.output_dir={folder}", "run.name=r"]
    overrides.append("log.target_top1=50")
    with make_trainer(comm, overrides, checkpoints=True) as a:
        batches = a.loader.batches(0, a.total_steps)
        for _, x, y in itertools.islice(batches, 5):
            a.pending_losses.append(a.train_step(x, y))  # losses not yet in a metrics record
        batches.close()
        a.clock.load(12.5, 20.25)  # seconds trained before (the clock runs in train(), not in train_step)
        a.evals = [(2, 0.5, 40.0, 1.0, 1.5), (4, 1.0, 60.0, 2.0, 3.0)]  # target 50: reached at step 4
        path = a.save_checkpoint("test")
        taken = snapshot(a)
    if layout == "schema-1" and comm.rank == 0:
        as_schema_1(path)
    comm.Barrier()
    assert taken["position"][0] == 5 and len(taken["position"][1]) == 5 and taken["position"][2]
    assert taken["mixup"] is not None and any(
        v[1] is not None for k, v in taken.items() if k.startswith("ngd/")
    )
    torch.rand(3), np.random.rand(3), random.random()  # move every generator on
    with make_trainer(comm, overrides) as b:
        assert snapshot(b)["position"][0] == 0
        state.resume(b)
        restored = snapshot(b)
    assert restored.keys() == taken.keys()
    for key in taken:
        assert_same(restored[key], taken[key], key)


def replace_entry(f: h5py.File, name: str, data: np.ndarray | None) -> None:
    del f[name]
    if data is None:
        f.create_group(name)
    else:
        f.create_dataset(name, data=data, fletcher32=True)


# A checkpoint whose per-rank entries do not fit (each file sealed again: damage the seal cannot see,
# say from another hpcngd version) is refused with one line naming the entry, before anything is
# restored; a row short, it hung (rank 0 failed alone inside the scatter).
DAMAGE = {
    "a row short": ("ranks/mc", lambda a: a[1:], "ranks/mc holds {short} rows for {size} ranks"),
    "a count short": (
        "ranks/ngd_counts",
        lambda a: a[:, :-1],
        "ranks/ngd_counts holds int64 ({size}, 3); this hpcngd stores int64 ({size}, 4) there",
    ),
    "another type": (
        "ranks/torch",
        lambda a: a.astype(np.int64),
        "ranks/torch holds int64 ({size}, 5056); this hpcngd stores uint8 ({size}, 5056) there",
    ),
    "a group": ("ranks/numpy", lambda a: None, "is incomplete: it lacks ranks/numpy"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_per_rank_state_that_does_not_fit_is_refused(comm: MPI.Comm, folder: Path, damage: str) -> None:
    overrides = [*SAVE, f"run.output_dir={folder}", "run.name=r"]
    with make_trainer(comm, overrides, checkpoints=True) as a:
        path = a.save_checkpoint("test")
    entry, change, message = DAMAGE[damage]
    if comm.rank == 0:
        with h5py.File(path, "r+") as f:
            replace_entry(f, entry, change(f[entry][()]))
        seal(path)
    comm.Barrier()
    with make_trainer(comm, overrides) as b, pytest.raises(AgreedError) as info:
        state.resume(b)
    assert message.format(short=comm.size - 1, size=comm.size) in str(info.value)
    assert b.step == 0


def test_resume_on_fewer_ranks_with_the_same_global_batch(comm: MPI.Comm, folder: Path) -> None:
    if comm.size == 1:
        pytest.skip("needs ranks to drop")
    overrides = [*SPNGD, *AUGMENT, *SAVE]
    whole = run(comm, overrides, folder, "whole")
    half = comm.Split(color=0 if comm.rank < comm.size // 2 else MPI.UNDEFINED, key=comm.rank)
    if half != MPI.COMM_NULL:
        ckpt = folder / "whole" / "checkpoints" / "ckpt-000000005.h5"
        resumed = run(half, overrides, folder, "half", resume=str(ckpt))
        half.Free()
        if comm.rank == 0:
            assert any(
                f"written by {comm.size} rank(s), resuming on {comm.size // 2} with the same global batch"
                == n
                for n in resumed["notes"]
            ), resumed["notes"]  # empirical Fisher: no sampling stream to restart
            assert not any("BatchNorm's batch" in n for n in resumed["notes"])  # fixed micro_batch_size
        got, want = figures(resumed["records"], 5), figures(whole["records"], 5)
        assert [r[:2] for r in got] == [r[:2] for r in want]
        losses = [(g[2], w[2]) for g, w in zip(got, want, strict=True) if g[0] == "train"]
        assert max(abs(g - w) / abs(w) for g, w in losses) <= 1e-5, losses
    comm.Barrier()


def test_resume_on_fewer_ranks_says_when_the_batchnorm_batch_changes(comm: MPI.Comm, folder: Path) -> None:
    """With data.micro_batch_size = 0 BatchNorm normalizes over the per-rank batch, which doubles when
    the ranks halve: the losses then part from the uninterrupted run's, and the log says why."""
    if comm.size == 1:
        pytest.skip("needs ranks to drop")
    overrides = [*SAVE, "data.micro_batch_size=0", "run.max_steps=6"]
    run(comm, overrides, folder, "whole")
    half = comm.Split(color=0 if comm.rank < comm.size // 2 else MPI.UNDEFINED, key=comm.rank)
    if half != MPI.COMM_NULL:
        ckpt = folder / "whole" / "checkpoints" / "ckpt-000000005.h5"
        notes = run(half, overrides, folder, "half", resume=str(ckpt))["notes"]
        half.Free()
        old, new = 16 // comm.size, 16 // (comm.size // 2)
        assert f"BatchNorm's batch changes from {old} to {new} images" in " ".join(notes)
    comm.Barrier()


def test_set_up_and_restore_are_not_counted_as_training_time(comm: MPI.Comm, folder: Path) -> None:
    """The first record's img/s counts its steps only, not the time before train() (a restore of a large
    checkpoint made the first record after every resume look several times slower)."""
    metrics = folder / "timed.jsonl"
    overrides = ["run.max_steps=3", f"run.output_dir={folder}", "run.name=timed"]
    with make_trainer(comm, overrides, MetricsLog(metrics, active=comm.rank == 0)) as t:
        t.timer.started -= 1000.0  # as if set-up and restore had taken 1000 s
        t.train()
        t.log.close()
    comm.Barrier()
    first = next(json.loads(line) for line in metrics.read_text().splitlines() if '"train"' in line)
    assert first["step"] == 3 and first["step_ms"] < 100e3, (
        first
    )  # (end of epoch 0) 333,333 ms with the 1000 s
    assert 0 < first["train_s"] <= first["elapsed_s"] < 100, first  # the run's clock starts with its loop


def test_nonfinite_state_is_never_saved(comm: MPI.Comm, folder: Path) -> None:
    overrides = [*SPNGD, f"run.output_dir={folder}", "run.name=nan", "run.max_steps=2"]
    with make_trainer(comm, overrides, checkpoints=True) as t:
        t.train()
        files = sorted(p.name for p in t.cfg.checkpoint_dir.iterdir())
        assert files == ["ckpt-000000002.h5", "latest"]
        if comm.rank == comm.size - 1:  # only one rank's replica goes bad
            with torch.no_grad():
                next(t.model.parameters())[0].fill_(float("nan"))
        with pytest.raises(
            Diverged, match=r"^the run diverged: model conv1.weight holds NaN or Inf at step 2; "
        ):
            t.save_checkpoint("test")
        comm.Barrier()
        assert sorted(p.name for p in t.cfg.checkpoint_dir.iterdir()) == files


def test_timed_checkpoints_are_agreed_by_every_rank(comm: MPI.Comm, folder: Path) -> None:
    overrides = [f"run.output_dir={folder}", "run.name=timed", "run.max_steps=3"]
    timed = ["checkpoint.every_minutes=1e-6", "checkpoint.at_end=false", "checkpoint.keep_last=5"]
    with make_trainer(comm, [*overrides, *timed], checkpoints=True) as t:
        t.train()  # rank 0's clock says "due" at every step; the others follow it
        files = sorted(p.name for p in t.cfg.checkpoint_dir.iterdir())
    assert files == [f"ckpt-{s:09d}.h5" for s in (1, 2, 3)] + ["latest"]


def test_a_mixup_batch_above_the_limit_is_left_out_and_said(comm: MPI.Comm, folder: Path) -> None:
    overrides = [*AUGMENT, f"run.output_dir={folder}", "run.name=big", "checkpoint.mixup_max_mib=0.01"]
    with make_trainer(comm, [*overrides, "run.max_steps=2"], checkpoints=True) as t:
        t.train()
        assert t.mixup is not None and t.mixup.prev is not None
    with make_trainer(comm, overrides) as b:
        _, notes = state.resume(b)
        assert b.step == 2 and b.mixup is not None and b.mixup.prev is None
    assert any("mixing restarts at this step" in n for n in notes)


def test_a_failed_write_is_agreed_while_other_ranks_send(comm: MPI.Comm, folder: Path) -> None:
    blocker = folder / "a-file"
    if comm.rank == 0:
        blocker.write_text("not a folder")
    comm.Barrier()
    overrides = [*SPNGD, *AUGMENT, f"run.output_dir={folder}", "run.name=nowhere", "run.max_steps=1"]
    with make_trainer(comm, [*overrides, f"checkpoint.dir={blocker}/sub"], checkpoints=True) as t:
        with pytest.raises(AgreedError, match="cannot write checkpoint"):
            t.train()  # rank 0 cannot write; the others still send it inverses and mixup rows
        assert t.step == 1


def test_a_checkpoint_that_would_not_fit_is_not_started(
    comm: MPI.Comm, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HDF5 meeting a full disk mid-file can crash the writing rank; so rank 0 compares the free space
    with the checkpoint's size first: too little, and every rank stops with one message, nothing written."""
    overrides = [*SPNGD, *AUGMENT, f"run.output_dir={folder}", "run.name=full", "run.max_steps=2"]
    with make_trainer(comm, overrides, checkpoints=True) as t:
        t.train()
        files = sorted(p.name for p in t.cfg.checkpoint_dir.iterdir())
        assert files == ["ckpt-000000002.h5", "latest"]
        expected = state._expected_bytes(t)
        size = (t.cfg.checkpoint_dir / files[0]).stat().st_size
        assert 0.9 * size <= expected <= size, (expected, size)  # the writer adds 2% and 1 MiB
        usage = shutil.disk_usage(folder)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=expected))
        t.step += 1
        with pytest.raises(AgreedError, match=r"ckpt-000000003.h5: [\d.]+ MiB free there, it needs about"):
            t.save_checkpoint("test")
        comm.Barrier()
        assert sorted(p.name for p in t.cfg.checkpoint_dir.iterdir()) == files
