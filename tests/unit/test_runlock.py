"""The run directory's lock: a live holder refuses a second run; a dead one's lock is taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcngd import runlock
from hpcngd.errors import UserError
from hpcngd.runlock import NAME, RunLock

HOLD = """
import sys, time
from collections.abc import Iterator
from pathlib import Path
from hpcngd.runlock import RunLock
lock = RunLock.take(Path(sys.argv[1]), float(sys.argv[2]))
print("held", flush=True)
time.sleep(60)
"""


def stale(run_dir: Path, **fields: object) -> None:
    """A lock left by a run that is gone, as written by another host unless ``fields`` say otherwise."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": "elsewhere", "pid": 4242, "job": "", "restart": 0, "started": "then", "beat_s": 0.1}
    (run_dir / NAME).write_text(json.dumps({**holder, "token": "theirs", "beats": 7, **fields}))


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``tmp_path/run``'s lock, renewed every 0.1 s."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run"), "0.1"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    yield proc
    proc.kill()
    proc.wait()


def test_take_renew_release(tmp_path: Path) -> None:
    run_dir = tmp_path / "out" / "run"  # made when missing
    with RunLock.take(run_dir, 0.05) as lock:
        first = json.loads((run_dir / NAME).read_text())
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
        assert first["beat_s"] == 0.05 and lock.held() and lock.notes == []
        time.sleep(0.4)
        assert json.loads((run_dir / NAME).read_text())["beats"] >= 3  # renewed
    assert not (run_dir / NAME).exists()


def test_a_live_holder_refuses_a_second_run_and_a_killed_one_is_taken_over_at_once(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    run_dir = tmp_path / "run"
    said: list[str] = []
    with pytest.raises(UserError) as exc:
        RunLock.take(run_dir, 30.0, say=said.append)  # watches for 3 of the holder's beats: 0.3 s
    message = str(exc.value)
    assert message.startswith(f"run.name: the run directory {run_dir} is in use by another run")
    assert f"pid {holder.pid}" in message and "give this run another run.name" in message
    assert said and "watching it for 0.3 s to see whether that run is alive" in said[0]
    assert json.loads((run_dir / NAME).read_text())["pid"] == holder.pid  # untouched

    holder.send_signal(signal.SIGKILL)  # dies without removing its lock
    holder.wait()
    left = json.loads((run_dir / NAME).read_text())
    (run_dir / NAME).write_text(json.dumps({**left, "beat_s": 30.0}))  # watching it would take 90 s
    t0 = time.monotonic()
    with RunLock.take(run_dir, 30.0, say=said.append) as lock:
        assert time.monotonic() - t0 < 2.5  # its process is gone: no watching, only the 2 s read-back
        assert lock.held() and len(said) == 1
        assert len(lock.notes) == 1 and lock.notes[0].startswith(
            f"took over {run_dir / NAME} from a run that ended without removing it "
            f"(host {socket.gethostname()}, pid {holder.pid}, started "
        )


def test_a_lock_not_renewed_is_taken_over_after_three_of_its_beats(tmp_path: Path) -> None:
    stale(tmp_path, beat_s=0.2)
    t0 = time.monotonic()
    with RunLock.take(tmp_path, 30.0, say=lambda line: None) as lock:
        assert 0.6 <= time.monotonic() - t0 < 2.0
        assert lock.notes == [
            f"took over {tmp_path / NAME} from a run that ended without removing it "
            "(host elsewhere, pid 4242, started then)"
        ]
        assert lock.held() and json.loads((tmp_path / NAME).read_text())["token"] == lock.me["token"]


def test_a_requeued_slurm_job_takes_its_earlier_run_s_lock_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.delenv("SLURM_CLUSTER_NAME", raising=False)
    stale(tmp_path, job="77", restart=0, beat_s=30.0)
    t0 = time.monotonic()
    with RunLock.take(tmp_path, 30.0) as lock:
        assert time.monotonic() - t0 < 2.5 and "job 77, host elsewhere" in lock.notes[0]
    stale(tmp_path, job="77", restart=1, beat_s=0.1)  # the same run of the job, on another node: watch
    with pytest.raises(UserError, match="in use by another run"):
        threading.Timer(0.1, lambda: stale(tmp_path, job="77", restart=1, beat_s=0.1, beats=8)).start()
        RunLock.take(tmp_path, 30.0, say=lambda line: None)


def test_a_lock_removed_while_watched_is_taken(tmp_path: Path) -> None:
    """Its holder ended during the watch: the directory is free."""
    stale(tmp_path, beat_s=10.0)
    threading.Timer(0.3, (tmp_path / NAME).unlink).start()
    t0 = time.monotonic()
    with RunLock.take(tmp_path, 30.0, say=lambda line: None) as lock:
        assert time.monotonic() - t0 < 3.0 and lock.notes == [] and lock.held()


def test_a_run_whose_lock_was_taken_over_is_told_and_leaves_the_new_holder_s_lock(tmp_path: Path) -> None:
    lock = RunLock.take(tmp_path, 0.05)
    stale(tmp_path)  # another run took it over while this one was suspended
    time.sleep(0.3)
    assert lock.lost and not lock.held()
    assert lock.lost_message().startswith(
        f"run.name: {tmp_path / NAME} no longer names this run (now: host elsewhere, pid 4242, started then)"
    )
    lock.release()
    assert json.loads((tmp_path / NAME).read_text())["token"] == "theirs"


def test_a_failed_read_of_its_own_lock_does_not_end_the_renewals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One EIO (a Lustre client evicted) must not stop the renewals: watchers would take the lock of a
    live run after 3 beats."""
    real, failures = runlock._read, [OSError(errno.EIO, "Input/output error")]

    def flaky(path: Path) -> tuple[bytes, dict[str, object]]:
        if failures:
            raise failures.pop()
        return real(path)

    with RunLock.take(tmp_path, 0.05) as lock:
        monkeypatch.setattr(runlock, "_read", flaky)
        time.sleep(0.4)
        assert not failures and not lock.lost and lock.held()
        assert json.loads((tmp_path / NAME).read_text())["beats"] >= 3
    assert "cannot renew" in capsys.readouterr().err and not (tmp_path / NAME).exists()


def test_a_process_is_gone_only_when_its_id_names_no_process_or_a_later_one_of_this_machine() -> None:
    me = runlock._identity()
    parent = {**runlock._identity(), "pid": os.getppid(), "start_ticks": runlock._start_ticks(os.getppid())}
    assert not runlock._certainly_gone(parent, me)  # alive
    assert runlock._certainly_gone({**parent, "start_ticks": parent["start_ticks"] + 1}, me)  # id reused
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = {**parent, "pid": int(done.stdout)}
    assert runlock._certainly_gone(dead, me)
    # another container of this host (its own PID namespace), or another boot: only watching tells
    assert not runlock._certainly_gone({**dead, "space": "other-boot:4026531836"}, me)
    assert not runlock._certainly_gone({**dead, "space": ""}, {**me, "space": ""})


def test_a_run_directory_that_cannot_be_made_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^run.output_dir: cannot take the lock .*file/run/run.lock"):
        RunLock.take(tmp_path / "file" / "run", 30.0)


@pytest.mark.parametrize(
    "content", [b"\x00not json", b'{"job": "78", "restart": "x", "pid": "y", "beat_s": true}']
)
def test_a_lock_of_unreadable_content_is_watched_for_this_run_s_beats(
    tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / NAME).write_bytes(content)
    t0 = time.monotonic()
    with RunLock.take(tmp_path, 0.1, say=lambda line: None) as lock:
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert lock.notes[0].startswith(f"took over {tmp_path / NAME} from a run that ended without")


def test_confirm_reads_nothing_while_renewed_and_renews_or_finds_the_takeover_after_a_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer asks every step and the checkpoint writer before it publishes: free while the
    renewals keep up; after a stall longer than 2 beats (a suspended job) it renews the lock at once,
    or finds that another run took it over in the meantime."""
    reads: list[Path] = []
    real = runlock._read
    monkeypatch.setattr(runlock, "_read", lambda path: reads.append(path) or real(path))
    with RunLock.take(tmp_path, 30.0) as lock:
        assert lock.confirm() and reads == []  # just renewed: sure for one more beat
        beats = json.loads((tmp_path / NAME).read_text())["beats"]
        lock._confirmed -= 61.0  # the job was suspended for 2 beats and more
        assert lock.confirm() and reads == [tmp_path / NAME]  # still its own: renewed now
        assert json.loads((tmp_path / NAME).read_text())["beats"] == beats + 1
        assert lock.confirm() and len(reads) == 1
        stale(tmp_path)  # another run takes it over while this one is suspended again
        lock._confirmed -= 61.0
        assert not lock.confirm() and lock.lost
        assert json.loads((tmp_path / NAME).read_text())["token"] == "theirs"  # untouched
    assert (tmp_path / NAME).exists()  # the other run's


def test_two_runs_taking_over_one_dead_lock_at_once_leave_one_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same job submitted twice after a crash, both started together: both judge the lock dead in
    the same moment and write it; only the one it names after the read-back may go on."""
    stale(tmp_path, beat_s=0.2)
    start, decided = threading.Barrier(2), threading.Barrier(2)
    write = RunLock._write

    def write_once_both_decided(self: RunLock) -> None:
        if self.me["beats"] == 0:  # the takeover's write, not a renewal's
            decided.wait(timeout=5)
        write(self)

    monkeypatch.setattr(RunLock, "_write", write_once_both_decided)
    taken: list[RunLock] = []
    refused: list[str] = []

    def contend() -> None:
        start.wait()
        try:
            taken.append(RunLock.take(tmp_path, 30.0, say=lambda line: None))
        except UserError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(taken) == 1 and len(refused) == 1, (taken, refused)
        assert refused[0].startswith(f"run.name: the run directory {tmp_path} is in use by another run")
        assert taken[0].held() and taken[0].notes[0].startswith("took over")
    finally:
        for lock in taken:
            lock.release()


def test_confirm_for_a_checkpoint_is_false_when_the_lock_cannot_be_read_after_a_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error tells nothing about who holds the lock: the run goes on (the renewals keep trying),
    but a checkpoint writer about to publish (and prune) after a stall must not take it as a yes."""
    with RunLock.take(tmp_path, 30.0) as lock:

        def unreadable(path: Path) -> tuple[bytes, dict[str, object]]:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(runlock, "_read", unreadable)
        assert lock.confirm(strict=True)  # renewed less than 2 beats ago: no read needed
        lock._confirmed -= 61.0  # suspended
        assert lock.confirm() and not lock.lost  # the step goes on
        assert not lock.confirm(strict=True) and not lock.lost
        assert lock.lost_message() == (
            f"run.name: cannot tell whether {tmp_path / NAME} still names this run ([Errno 5] "
            "Input/output error): stopping without publishing the checkpoint"
        )
        monkeypatch.undo()
        assert lock.confirm(strict=True) and lock.error is None  # readable again: renewed


def test_a_dead_holder_found_at_the_run_directory_is_not_watched_again_at_its_checkpoint_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crashed run on another machine leaves both locks: one watch (3 beats) tells it is dead."""
    stale(tmp_path / "run")
    stale(tmp_path / "run/checkpoints")
    places = [(tmp_path / "run", runlock.RUN_DIR), (tmp_path / "run/checkpoints", runlock.CHECKPOINT_DIR)]
    locks = runlock.take_all(places, 30.0)
    try:
        assert [lock.held() for lock in locks] == [True, True]
        assert capsys.readouterr().err.count("watching it for 0.3 s") == 1
        assert all(lock.notes[0].startswith("took over") for lock in locks)
    finally:
        for lock in reversed(locks):
            lock.release()
    stale(tmp_path / "run")
    stale(tmp_path / "run/checkpoints", pid=4343)  # another holder there: watched too
    locks = runlock.take_all(places, 30.0)
    for lock in reversed(locks):
        lock.release()
    assert capsys.readouterr().err.count("watching it for 0.3 s") == 2


def test_a_read_error_at_the_takeovers_read_back_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused after it wrote its token, a run would leave a lock that names no live run: the other
    contender, if any, has been refused already, and both would end."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    stale(tmp_path, job="77", restart=0)  # a requeue: taken over at once
    calls: list[int] = []
    real = runlock._read

    def flaky(path: Path) -> tuple[bytes, dict[str, object]]:
        calls.append(1)
        if len(calls) == 2:  # the read-back
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(runlock, "_read", flaky)
    with RunLock.take(tmp_path, 30.0, say=lambda line: None) as lock:
        assert lock.held() and lock.notes[0].startswith("took over") and len(calls) >= 3
