"""Checkpoints as a batch job meets them: a stop signal, a writer killed mid-write, damaged files,
a changed run file, and ``hpcngd inspect``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import ENV, ROOT, command, error_lines, hpcngd, with_sitecustomize, write_run

from hpcngd.checkpoint import CRASH_HOOK, USER_BLOCK, seal

SAVE = "\n[checkpoint]\nevery_steps = 2\nkeep_last = 5\n"  # tiny: 2 steps an epoch, 2 epochs
NO_SAVE = "\n[checkpoint]\nevery_steps = 0\n"
LONG = ["--set", "run.epochs=500", "--set", "log.every_steps=1"]  # a record a step until stopped


def checkpoints(tmp_path: Path) -> list[str]:
    """The run's checkpoint folder, but for its lock (left there by a run that was killed)."""
    return sorted(p.name for p in (tmp_path / "out/tiny/checkpoints").iterdir() if p.name != "run.lock")


def records(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "out/tiny/metrics.jsonl").read_text().splitlines()]


def rank_pids(launcher: int) -> list[int]:
    """Processes started by ``launcher`` (for mpiexec: the ranks; for a rank: its decoding workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            children.append(int(stat.parent.name))
    return sorted(children)


def process_state(pid: int) -> str:
    """R, S, T (stopped), ... or "" when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def start_taking_over(args: list[str]) -> subprocess.Popen[str]:
    """A 2-rank run of ``args`` on a directory whose holder looks dead, once it has taken the lock over."""
    job = subprocess.Popen(
        command(*args, ranks=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    assert job.stdout is not None
    for line in job.stdout:
        if "note: took over" in line:
            break
    return job


def start_long_run(args: list[str], tmp_path: Path, env: dict[str, str] = ENV) -> subprocess.Popen[str]:
    """A 2-rank run of ``args`` (with LONG), once it has logged 3 records."""
    cmd = command(*args, ranks=2)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = tmp_path / "out/tiny/metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    return job


def test_stop_signal_to_one_rank_checkpoints_and_exits_3(tmp_path: Path, demo: Path) -> None:
    args = [str(write_run(tmp_path, demo, extra=NO_SAVE)), *LONG]
    job = start_long_run(args, tmp_path)
    ranks = rank_pids(job.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGTERM)
    t0 = time.monotonic()
    out, err = job.communicate(timeout=90)
    assert time.monotonic() - t0 < 60  # one step (about 0.1 s here) plus the save, with room for load
    assert job.returncode == 3, err
    stopped = [r for r in records(tmp_path) if r["kind"] == "checkpoint"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "stop signal"
    step = stopped[0]["step"]
    assert checkpoints(tmp_path) == [f"ckpt-{step:09d}.h5", "latest"]
    (line,) = [x for x in out.splitlines() if x.startswith("stopped by")]
    assert line.startswith(f"stopped by a signal to another rank at step {step} after a checkpoint; exit 3 (")
    assert " s of training, " in line  # the run's clock

    again = hpcngd(*args, "--set", f"run.max_steps={step + 2}", ranks=2)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {tmp_path}/out/tiny/checkpoints/ckpt-{step:09d}.h5 (step {step})" in again.stdout
    steps = [r["step"] for r in records(tmp_path) if r["kind"] == "train"]
    assert steps == list(range(1, step + 3))  # one record a step, none lost, none twice
    # The run's clock goes on from the checkpoint's: the seconds trained before the stop are kept.
    clock = [(r["train_s"], r["elapsed_s"]) for r in records(tmp_path)]  # every kind, in file order
    trained, elapsed = [t for t, _ in clock], [e for _, e in clock]
    assert all(0 < t <= e for t, e in clock), clock
    assert trained == sorted(trained) and elapsed == sorted(elapsed), clock
    with h5py.File(tmp_path / f"out/tiny/checkpoints/ckpt-{step:09d}.h5") as f:
        saved = (f.attrs["train_s"], f.attrs["elapsed_s"])  # when the checkpoint's writing began
    assert saved == (stopped[0]["train_s"], stopped[0]["elapsed_s"])  # and so does its record
    resumed = next(r for r in records(tmp_path) if r["kind"] == "train" and r["step"] == step + 1)
    assert resumed["train_s"] > saved[0] and resumed["elapsed_s"] > saved[1], (resumed, saved)
    assert " s of training, " in again.stdout.splitlines()[-1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    children = rank_pids(pid)
    return children + [d for c in children for d in descendants(c)]


@pytest.mark.parametrize("start_method", ["default", "forkserver"])
def test_stop_signal_to_every_process_of_the_job_checkpoints_and_exits_3(
    tmp_path: Path, demo: Path, start_method: str
) -> None:
    """What Slurm does at the time limit or on scancel: SIGTERM to every process of the job, the ranks'
    decoding workers too (they ignore it and end with their loader). "forkserver" makes it Python's
    default start method, as it is from Python 3.14 on Linux: a forkserver died of the signal, its workers
    with it, and the ranks failed."""
    code = f"import multiprocessing\nmultiprocessing.set_start_method({start_method!r})\n"
    env = ENV if start_method == "default" else with_sitecustomize(tmp_path, code)
    job = start_long_run([str(write_run(tmp_path, demo, workers=2, extra=NO_SAVE)), *LONG], tmp_path, env)
    ranks = rank_pids(job.pid)
    workers = [w for r in ranks for w in descendants(r)]
    assert len(ranks) == 2 and len(workers) >= 4, (ranks, workers)
    if start_method != "default":
        assert {f"ran.{pid}" for pid in ranks} <= {p.name for p in (tmp_path / "site").iterdir()}
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    for pid in workers:
        # a worker may be gone already (its rank is stopping, or its loader began an epoch): Slurm
        # signals only the processes there are
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    out, err = job.communicate(timeout=90)
    assert job.returncode == 3, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    stopped = [r for r in records(tmp_path) if r["kind"] == "checkpoint"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "stop signal"
    assert checkpoints(tmp_path) == [f"ckpt-{stopped[0]['step']:09d}.h5", "latest"]
    assert "stopped by SIGTERM at step" in out


def test_stop_signal_after_the_run_is_over_changes_nothing(tmp_path: Path, demo: Path) -> None:
    """A signal in the seconds between "done" and the ranks' exit (MPI's finalize, interpreter teardown)
    killed them with signal 10, so that a scheduler recorded a finished run as failed."""
    cmd = command(str(write_run(tmp_path, demo, extra=NO_SAVE)), ranks=2)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert job.stdout is not None
    lines = []
    for line in job.stdout:
        lines.append(line)
        if "done:" in line:
            break
    assert any("done:" in line for line in lines), lines
    for pid in rank_pids(job.pid):
        with contextlib.suppress(ProcessLookupError):  # a rank may have ended already
            os.kill(pid, signal.SIGUSR1)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert "signal" not in err, err


def test_a_second_run_on_a_run_directory_in_use_is_refused(tmp_path: Path, demo: Path) -> None:
    """The same job submitted twice: the second must not resume from the first's checkpoints and write
    its records and checkpoints beside the first's."""
    args = [str(write_run(tmp_path, demo, extra=SAVE)), *LONG]
    job = start_long_run([*args, "--set", "run.lock_renew_s=1"], tmp_path)
    ranks = rank_pids(job.pid)
    config_toml = (tmp_path / "out/tiny/config.toml").read_text()
    second = hpcngd(*args, "--set", "run.max_steps=3", ranks=2)
    assert second.returncode == 2, second.stderr
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        f"hpcngd: error: run.name: the run directory {tmp_path}/out/tiny is in use by another run ("
    ), second.stderr
    assert f"pid {ranks[0]}, started" in lines[0] or f"pid {ranks[1]}, started" in lines[0], (lines, ranks)
    assert "watching it for 3 s" in second.stderr
    assert (tmp_path / "out/tiny/config.toml").read_text() == config_toml  # the second wrote nothing
    # Another run whose checkpoint.dir names this run's default folder: it would prune its checkpoints.
    folder = tmp_path / "out/tiny/checkpoints"
    intruder = hpcngd(*args, "--set", "run.name=other", "--set", f"checkpoint.dir={folder}", ranks=2)
    assert intruder.returncode == 2, intruder.stderr
    assert error_lines(intruder.stderr)[0].startswith(
        f"hpcngd: error: checkpoint.dir: the checkpoint folder {folder} is in use by another run ("
    ), intruder.stderr

    os.kill(ranks[0], signal.SIGTERM)
    _, err = job.communicate(timeout=90)
    assert job.returncode == 3, err
    assert not (tmp_path / "out/tiny/run.lock").exists()  # removed at the end of the run
    steps = [r["step"] for r in records(tmp_path) if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))


def test_runs_of_different_names_cannot_share_a_checkpoint_dir(tmp_path: Path, demo: Path) -> None:
    """A checkpoint.dir outside the run directory (a scratch folder) may be set for several runs: at the
    same time they would prune each other's checkpoints; one after the other, the second would resume
    from the first's."""
    shared = tmp_path / "scratch"
    run_file = write_run(tmp_path, demo, extra=f'\n[checkpoint]\nevery_steps = 0\ndir = "{shared}"\n')
    args = [str(run_file), "--set", "run.lock_renew_s=1"]
    first = start_long_run([*args, *LONG], tmp_path)
    assert (shared / "run.lock").exists() and (tmp_path / "out/tiny/run.lock").exists()
    other = hpcngd(*args, "--set", "run.name=other", ranks=2)
    assert other.returncode == 2, other.stderr
    assert error_lines(other.stderr)[0].startswith(
        f"hpcngd: error: checkpoint.dir: the checkpoint folder {shared} is in use by another run ("
    ), other.stderr
    assert "give this run another checkpoint.dir" in other.stderr
    assert not (tmp_path / "out/other/metrics.jsonl").exists()  # refused before it wrote anything
    os.kill(rank_pids(first.pid)[0], signal.SIGTERM)
    _, err = first.communicate(timeout=90)
    assert first.returncode == 3, err
    assert not (shared / "run.lock").exists() and not (tmp_path / "out/tiny/run.lock").exists()
    (saved,) = [p.name for p in shared.iterdir() if p.name.startswith("ckpt-")]

    refusal = [
        f"hpcngd: error: checkpoint.dir: {shared} holds another run's checkpoints ({saved} was written by "
        f"the run in {tmp_path}/out/tiny; this run's directory is {tmp_path}/out/other): two runs there "
        "would resume from and prune each other's; give each run its own checkpoint.dir (list run.name in "
        "checkpoint.allow_changes to use them anyway)"
    ]
    later = hpcngd(*args, "--set", "run.name=other")  # after the first: it must not resume from its file
    assert later.returncode == 2, later.stderr
    assert error_lines(later.stderr) == refusal
    assert list((tmp_path / "out/other").iterdir()) == []  # refused before it wrote anything
    named = hpcngd(*args, "--set", "run.name=other", "--set", f"checkpoint.resume={shared / saved}")
    assert error_lines(named.stderr) == refusal  # nor write (and prune) there after resuming from a file
    # The first run's directory spelled another way is the same run: it resumes (and has nothing to do).
    spelled = hpcngd(*args, "--set", f"run.output_dir={os.path.relpath(tmp_path / 'out', ROOT)}/")
    assert spelled.returncode == 0, spelled.stderr
    assert f"resuming from {shared / saved}" in spelled.stdout
    allowed = hpcngd(*args, "--set", "run.name=other", "--set", 'checkpoint.allow_changes=["run.name"]')
    assert allowed.returncode == 0, allowed.stderr
    assert f"resuming from {shared / saved}" in allowed.stdout


def test_a_run_whose_directory_was_taken_over_while_suspended_stops(tmp_path: Path, demo: Path) -> None:
    """A job suspended for longer than 3 renewals (Slurm's gang scheduling, PreemptMode=SUSPEND) looks
    dead: a second run takes its directory over. When the first resumes it must stop at once, not
    write records and checkpoints beside the second's (a checkpoint every 2 steps: it may have been
    suspended inside one's write)."""
    args = [str(write_run(tmp_path, demo, extra=SAVE)), *LONG, "--set", "run.lock_renew_s=1"]
    first = start_long_run(args, tmp_path)
    first_ranks = rank_pids(first.pid)
    for pid in first_ranks:
        os.kill(pid, signal.SIGSTOP)
    second = start_taking_over(args)
    for pid in first_ranks:
        os.kill(pid, signal.SIGCONT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(
        f"hpcngd: error: run.name: {tmp_path}/out/tiny/run.lock no longer names this run (now: "
    ), err
    assert "stopping without a checkpoint" in lines[0]
    assert (tmp_path / "out/tiny/run.lock").exists()  # the second run's, left in place
    second_ranks = rank_pids(second.pid)
    os.kill(second_ranks[0], signal.SIGTERM)
    _, err = second.communicate(timeout=90)
    assert second.returncode == 3, err
    assert not (tmp_path / "out/tiny/run.lock").exists()


def test_a_run_suspended_while_writing_a_checkpoint_does_not_publish_it_after_a_takeover(
    tmp_path: Path, demo: Path
) -> None:
    """Suspended inside the write of step 4's checkpoint (the test hook stops the writer), the first run
    looks dead; a second run takes over, removes the first's temporary file and resumes from step 2.
    When the first resumes, it must not publish its checkpoint, prune or move ``latest``: it stops."""
    args = [str(write_run(tmp_path, demo, extra=SAVE)), *LONG, "--set", "run.lock_renew_s=1"]
    env = {**ENV, CRASH_HOOK: "4:5:STOP"}
    first = subprocess.Popen(
        command(*args, ranks=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    deadline, stopped = time.monotonic() + 90, []
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.2)
        stopped = [pid for pid in rank_pids(first.pid) if process_state(pid) == "T"]
    assert len(stopped) == 1, "the writer never reached the hook"
    stopped_at = time.time()  # after the first run's writer began its step 4
    assert [p for p in checkpoints(tmp_path) if not p.startswith(".")] == ["ckpt-000000002.h5", "latest"]
    second = start_taking_over(args)
    os.kill(stopped[0], signal.SIGCONT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "run.lock no longer names this run" in lines[0], err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(r["kind"] == "checkpoint" for r in records(tmp_path)) < 3:
        time.sleep(0.2)
    os.kill(rank_pids(second.pid)[0], signal.SIGTERM)
    _, err = second.communicate(timeout=90)
    assert second.returncode == 3, err
    saved = [r["step"] for r in records(tmp_path) if r["kind"] == "checkpoint"]
    assert saved[:3] == [2, 4, 6], saved  # the first run's step 2 (kept by the resume), then the second's
    names = checkpoints(tmp_path)
    assert names == [*(f"ckpt-{s:09d}.h5" for s in saved[-5:]), "latest"], names  # keep_last = 5
    assert (tmp_path / "out/tiny/checkpoints/latest").read_text() == f"ckpt-{saved[-1]:09d}.h5\n"
    for step in saved[-5:]:
        with h5py.File(tmp_path / f"out/tiny/checkpoints/ckpt-{step:09d}.h5", "r") as f:
            assert step == 2 or f.attrs["created"] > stopped_at  # the second run's


def test_writer_killed_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, demo: Path) -> None:
    run_file = write_run(tmp_path, demo, extra=SAVE)
    crashed = hpcngd(str(run_file), env={CRASH_HOOK: "4:5"})  # dies in the checkpoint of step 4
    assert crashed.returncode != 0
    left = checkpoints(tmp_path)
    assert left[0].startswith(".ckpt-000000004.h5.") and left[1:] == ["ckpt-000000002.h5", "latest"], left
    assert (tmp_path / "out/tiny/checkpoints/latest").read_text() == "ckpt-000000002.h5\n"

    resumed = hpcngd(str(run_file), ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "ckpt-000000002.h5 (step 2)" in resumed.stdout
    # the killed run's lock: its process is gone, so it is taken over without watching it (30 s beats)
    assert f"note: took over {tmp_path}/out/tiny/run.lock from a run that ended without removing it" in (
        resumed.stdout
    )
    assert "watching" not in resumed.stderr
    assert "from step 2" in resumed.stdout and "done: 4 steps" in resumed.stdout
    assert checkpoints(tmp_path) == ["ckpt-000000002.h5", "ckpt-000000004.h5", "latest"]
    done = hpcngd(str(run_file))  # resubmitted after it finished
    assert done.returncode == 0 and "nothing to do: the run is complete at step 4" in done.stdout


def test_a_resume_with_another_global_batch_keeps_the_records_its_checkpoint_had(
    tmp_path: Path, demo: Path
) -> None:
    """Steps count the new batch after such a resume (step 4 of batch 20 is step 2 of batch 40); the
    records are kept up to the checkpoint's record, not by the new step (which dropped the evaluation, and
    any target record, of the steps in between), at this resume and the next."""
    run_file = write_run(tmp_path, demo, extra=SAVE)
    assert hpcngd(str(run_file)).returncode == 0  # 40 images, batch 20: evaluated at steps 2 and 4
    batch = ["--set", "data.batch_size=40", "--set", 'checkpoint.allow_changes=["data.batch_size"]']
    res = hpcngd(str(run_file), "--set", "run.epochs=3", *batch)
    assert res.returncode == 0, res.stderr
    assert "ckpt-000000004.h5 (step 2)" in res.stdout
    evals = [(r["step"], r["epoch"]) for r in records(tmp_path) if r["kind"] == "eval"]
    assert evals == [(2, 1.0), (4, 2.0), (3, 3.0)], evals
    again = hpcngd(str(run_file), "--set", "run.epochs=4", *batch)  # from step 3 of batch 40
    assert again.returncode == 0 and "ckpt-000000003.h5 (step 3)" in again.stdout, again.stderr
    evals = [(r["step"], r["epoch"]) for r in records(tmp_path) if r["kind"] == "eval"]
    assert evals == [(2, 1.0), (4, 2.0), (3, 3.0), (4, 4.0)], evals


def test_damaged_checkpoints(tmp_path: Path, demo: Path) -> None:
    run_file = write_run(tmp_path, demo, extra=SAVE)
    assert hpcngd(str(run_file)).returncode == 0
    folder = tmp_path / "out/tiny/checkpoints"
    newest = folder / "ckpt-000000004.h5"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated

    explicit = hpcngd(str(run_file), "--set", f"checkpoint.resume={newest}", ranks=2)
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    (line,) = error_lines(explicit.stderr)
    assert line.startswith(f"hpcngd: error: checkpoint {newest}: truncated or extended: 4,488 bytes, ")

    longer = hpcngd(str(run_file), "--set", "run.epochs=3", ranks=2)  # resume = auto
    assert longer.returncode == 0, longer.stderr
    assert "set aside as ckpt-000000004.h5.corrupt, trying the previous one" in longer.stdout
    assert "ckpt-000000002.h5 (step 2)" in longer.stdout and "done: 6 steps" in longer.stdout
    assert "run.epochs 2 -> 3" in longer.stdout

    with h5py.File(folder / "ckpt-000000006.h5", "a") as f:  # a pickled payload slipped in
        f["model/payload"] = np.void(b"\x80\x04\x95 pickle")
    seal(folder / "ckpt-000000006.h5")  # and sealed again: the seal finds damage, not intent
    bad = hpcngd(str(run_file), "--set", "run.epochs=4", ranks=2)
    assert bad.returncode == 2
    assert len(error_lines(bad.stderr)) == 1 and "refusing to load it" in bad.stderr


def test_when_every_checkpoint_is_damaged_no_resubmission_starts_over(tmp_path: Path, demo: Path) -> None:
    """The first resubmission sets every damaged file aside and fails; later ones must not start from
    step 0 over the run's metrics: they are refused until the files are moved away."""
    run_file = write_run(tmp_path, demo, extra=SAVE)
    assert hpcngd(str(run_file)).returncode == 0
    folder = tmp_path / "out/tiny/checkpoints"
    for name in ("ckpt-000000002.h5", "ckpt-000000004.h5"):
        (folder / name).write_bytes((folder / name).read_bytes()[:5000])
    history = (tmp_path / "out/tiny/metrics.jsonl").read_text()
    first = hpcngd(str(run_file), "--set", "run.epochs=3", ranks=2)
    assert first.returncode == 2 and "no usable checkpoint in" in first.stderr
    assert first.stderr.count("trying the previous one") == 1  # not after the oldest one
    again = hpcngd(str(run_file), "--set", "run.epochs=3", ranks=2)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert error_lines(again.stderr) == [
        f"hpcngd: error: {folder} holds only checkpoints set aside as damaged (ckpt-000000002.h5.corrupt, "
        "ckpt-000000004.h5.corrupt): move them away to start this run over, or name a checkpoint in "
        "checkpoint.resume"
    ]
    assert (tmp_path / "out/tiny/metrics.jsonl").read_text() == history
    assert not (tmp_path / "out/tiny/run.lock").exists()  # an exit 2 after the lock was taken removes it
    for path in folder.glob("*.corrupt"):
        path.rename(tmp_path / path.name)
    fresh = hpcngd(str(run_file), "--set", "run.epochs=3")
    assert fresh.returncode == 0 and "done: 6 steps" in fresh.stdout and "resuming" not in fresh.stdout


def test_damaged_run_file_attribute_and_latest_pointer(tmp_path: Path, demo: Path) -> None:
    """In a file without the SHA-256 seal (an earlier hpcngd's), the run file a checkpoint stores is an
    attribute without a checksum: text that is not TOML (hpcngd wrote TOML) is damage, set aside like a
    bad checksum. A ``latest`` that is not text is ignored."""
    run_file = write_run(tmp_path, demo, extra=SAVE)
    assert hpcngd(str(run_file)).returncode == 0
    folder = tmp_path / "out/tiny/checkpoints"
    with h5py.File(folder / "ckpt-000000004.h5", "a") as f:
        f.attrs["run_file"] = str(f.attrs["run_file"]).replace("[model]", "[mod\x05el")
    newest = folder / "ckpt-000000004.h5"
    newest.write_bytes(newest.read_bytes()[USER_BLOCK:])  # no user block: an earlier hpcngd's layout
    (folder / "latest").write_bytes(b"\xff\xfe\x00garbage")
    res = hpcngd(str(run_file), "--set", "run.epochs=3", ranks=2)
    assert res.returncode == 0, res.stderr
    assert "its stored run file is damaged" in res.stdout
    assert "set aside as ckpt-000000004.h5.corrupt, trying the previous one" in res.stdout
    assert "ckpt-000000002.h5 (step 2)" in res.stdout and "done: 6 steps" in res.stdout


def test_changed_run_file_and_resume_never(tmp_path: Path, demo: Path) -> None:
    """Refused runs, each leaving the run's record (its resolved run file) as it was."""
    run_file = write_run(tmp_path, demo, extra=SAVE)
    assert hpcngd(str(run_file)).returncode == 0
    record = (tmp_path / "out/tiny/config.toml").read_text()
    other = hpcngd(str(run_file), "--set", "model.arch=resnet20", ranks=2)
    assert other.returncode == 2
    (line,) = error_lines(other.stderr)
    assert "was written with model.arch = 'resnet8', the run file says 'resnet20'" in line
    assert "checkpoint.allow_changes" in line
    allowed = hpcngd(
        str(run_file), "--set", "model.arch=resnet20", "--set", 'checkpoint.allow_changes=["model.*"]'
    )
    assert allowed.returncode == 2 and "holds another model than resnet20" in allowed.stderr
    # the initialization only sets weights that a resume overwrites: not a trajectory change
    init = hpcngd(str(run_file), "--set", "model.init=fan_in", "--set", "model.zero_init_residual=true")
    assert init.returncode == 0 and "nothing to do" in init.stdout, init.stderr
    assert "run file differs from the checkpoint's: " in init.stdout
    assert "model.zero_init_residual False -> True" in init.stdout and "model.init 'fan_out' -> 'fan_in'" in (
        init.stdout
    )
    record = (tmp_path / "out/tiny/config.toml").read_text()
    never = hpcngd(str(run_file), "--set", "checkpoint.resume=never")
    assert never.returncode == 2 and 'checkpoint.resume = "never" but' in never.stderr
    assert (tmp_path / "out/tiny/config.toml").read_text() == record


def test_inspect(tmp_path: Path, demo: Path) -> None:
    run_file = write_run(tmp_path, demo, extra=SAVE)
    assert hpcngd(str(run_file)).returncode == 0
    shown = hpcngd("inspect", str(tmp_path / "out/tiny/checkpoints/ckpt-000000004.h5"))
    assert shown.returncode == 0, shown.stderr
    assert "step 4 (epoch 2.0) | 1 rank(s) on 1 node(s) | model resnet8" in shown.stdout
    assert "model" in shown.stdout and 'arch = "resnet8"' in shown.stdout
    # the `latest` pointer reads as the checkpoint it names (was: "not an hpcngd checkpoint, or its seal ...")
    pointer = tmp_path / "out/tiny/checkpoints/latest"
    named = pointer.parent / pointer.read_text().strip()
    latest = hpcngd("inspect", str(pointer))
    assert latest.returncode == 0 and latest.stdout.startswith(f"{named}: hpcngd checkpoint"), latest
    stray = tmp_path / "elsewhere" / "latest"
    stray.parent.mkdir()
    stray.write_text("../tiny.toml\n")
    res = hpcngd("inspect", str(stray))
    assert res.returncode == 2 and error_lines(res.stderr) == [
        f"hpcngd: error: checkpoint {stray}: the latest pointer names '../tiny.toml', not a ckpt-*.h5"
    ], res.stderr
    stray.write_bytes(named.read_bytes())  # a checkpoint someone named `latest` is read as it is
    copy = hpcngd("inspect", str(stray))
    assert copy.returncode == 0 and copy.stdout.startswith(f"{stray}: hpcngd checkpoint"), copy
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    res = hpcngd("inspect", str(junk))
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1 and str(junk) in res.stderr


def test_dali_run_with_mixup_and_erasing_resumes_bit_for_bit(tmp_path: Path, demo: Path) -> None:
    pytest.importorskip("nvidia.dali")
    run_file = write_run(tmp_path, demo, extra=SAVE)
    args = [
        str(run_file),
        "--set", "data.source=dali",
        "--set", "data.mixup_alpha=0.5",
        "--set", "data.random_erasing=0.5",
        "--set", "log.every_steps=1",
        "--set", "run.epochs=3",
    ]  # fmt: skip
    whole = hpcngd(*args, ranks=2)
    assert whole.returncode == 0, whole.stderr
    assert "dali (cpu) data: 40 train / 20 val images" in whole.stdout
    first = [(r["step"], r["loss"]) for r in records(tmp_path) if r["kind"] == "train"]
    ckpt = tmp_path / "out/tiny/checkpoints/ckpt-000000002.h5"
    again = hpcngd(*args, "--set", "run.name=again", "--set", f"checkpoint.resume={ckpt}", ranks=2)
    assert again.returncode == 0, again.stderr
    lines = (tmp_path / "out/again/metrics.jsonl").read_text().splitlines()
    resumed = [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]
    assert resumed == first[2:] and len(resumed) == 4
