"""One live run per run directory: ``RUN_DIR/run.lock``, renewed by its holder.

Two jobs on one run directory (the same batch script submitted twice, a resubmission while the first
job still runs) would both resume from the same checkpoint and then interleave their records in
``metrics.jsonl`` and their checkpoints in one folder. Rank 0 therefore takes the run directory's lock
before anything is written there, and a second run is refused with one line naming the holder.

A lock left by a run that died without removing it (killed, node lost) must not block its restart, and
file systems shared between nodes give no lock that dies with its process (``flock`` is off on many
Lustre and NFS mounts) and no clock to compare modification times against. So the holder rewrites the
file every ``beat`` seconds with a counter, and a newcomer that finds the lock decides:

- the holder is gone for certain: its process id names no process, or a later one, on this machine
  since its boot and in this PID namespace (containers sharing a host name have their own), or it was
  the same Slurm job at an earlier restart (``SLURM_RESTART_COUNT``, a requeue): taken over at once;
- otherwise it watches the file for 3 of the holder's beats (``run.lock_renew_s``, written in the file):
  any change means a live holder and the run is refused; none means a dead holder, and the lock is
  taken over (the start-up log says so).

This is a guard against mistakes, not a lock manager. Two newcomers that take over one dead run's lock
in the same moment (the same job submitted twice, started together) both write it; each reads it back
after two of its polls and only the one it names goes on (the other is refused). A holder that finds
its lock taken (it was suspended for 3 beats, or the lock was overwritten) sets ``lost``, and the trainer
stops every rank at the next step without a checkpoint (exit 2). :meth:`RunLock.confirm` tells the
trainer, and the checkpoint writer just before it publishes a file: while renewals keep up it costs
nothing, and after a stall (a suspended job) it renews at once, so a run that resumes learns at its next
step, and before it publishes a checkpoint, that its directory was taken over.

The checkpoint folder has a lock of its own, the default one inside the run directory too: a run whose
``checkpoint.dir`` names a folder that another run uses would resume from, and prune, its checkpoints.
A holder found dead at the run directory is not watched again at its checkpoint folder.

The holder rewrites the file in place (not by rename), because an NFS client revalidates a file's
data when it opens it but may keep a folder's listing cached for up to a minute.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hpcngd.errors import UserError

NAME = "run.lock"
WATCHED_BEATS = 3  # a newcomer watches another's lock this many of its beats before calling it dead


def _proc_space() -> str:
    """Where a process id means one process: this boot of this machine and this PID namespace (containers
    that share a host name have their own); "" where /proc does not say (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return -1  # there, but unreadable
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def _identity() -> dict[str, Any]:
    """Who holds a lock: host, process, batch job (Slurm or PBS) and when it started."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or ""
    cluster = os.environ.get("SLURM_CLUSTER_NAME")
    space = _proc_space()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "space": space,
        "start_ticks": _start_ticks(os.getpid()) if space else None,
        "job": f"{job} on {cluster}" if job and cluster else job,
        "restart": _count(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _count(text: object) -> int:
    """A restart count (0 when it is not one)."""
    return int(text) if isinstance(text, int) or (isinstance(text, str) and text.isdigit()) else 0


def _describe(holder: dict[str, Any]) -> str:
    job = f"job {holder['job']}, " if holder.get("job") else ""
    host, pid, started = (holder.get(k, "?") for k in ("host", "pid", "started"))
    return f"{job}host {host}, pid {pid}, started {started}"


def _read(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The lock's bytes and what they say (an empty dict while its writer is midway)."""
    raw = path.read_bytes()
    try:
        holder = json.loads(raw)
    except ValueError:
        return raw, {}
    return raw, holder if isinstance(holder, dict) else {}


def _same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two locks' contents name the same process of the same job (its start time included)."""
    keys = ("host", "pid", "space", "start_ticks", "job", "restart", "started")
    return all(a.get(k) == b.get(k) for k in keys) and a.get("pid") is not None


def _certainly_gone(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    """True when the holder cannot be alive: known without waiting."""
    if holder.get("job") and holder.get("job") == me["job"] and _count(holder.get("restart")) < me["restart"]:
        return True  # Slurm requeued this job: its earlier run has ended
    pid = holder.get("pid")
    if not me["space"] or holder.get("space") != me["space"] or not isinstance(pid, int):
        return False  # another machine, boot or container, or no /proc: only watching tells
    if pid == me["pid"]:
        return True  # this process, from an earlier run in it that ended
    ticks = _start_ticks(pid)
    if ticks is None:
        return True  # no such process
    if ticks == -1 or holder.get("start_ticks") is None:
        return False  # a process, but which one cannot be told
    return ticks != holder["start_ticks"]  # the id names a later process now


class Place(NamedTuple):
    """What a lock keeps, for its messages."""

    where: str  # the run-file key that places the folder
    what: str  # what the folder is
    key: str  # the key a refused run changes to go elsewhere
    holds: str  # what two runs there would mix


RUN_DIR = Place("run.output_dir", "the run directory", "run.name", "metrics and checkpoints")
CHECKPOINT_DIR = Place("checkpoint.dir", "the checkpoint folder", "checkpoint.dir", "checkpoints")


class RunLock:
    """The lock of one run directory (or checkpoint folder), held by rank 0 from start-up to the end of
    the run.

    Use :meth:`take`; then ``with lock:`` releases it at the end. ``notes`` says what taking it found.
    """

    def __init__(self, path: Path, beat: float, place: Place = RUN_DIR) -> None:
        self.path = path
        self.beat = beat
        self.place = place
        self.me = {**_identity(), "token": uuid.uuid4().hex, "beat_s": beat, "beats": 0}
        self.notes: list[str] = []
        self.lost = False  # set when another run took the lock over
        self.taken_from: dict[str, Any] | None = None  # the dead holder this run took the lock over from
        self.error: OSError | None = None  # why the last renewal failed (None: it did not)
        self._confirmed = time.monotonic()  # when the file last surely named this run (before a rewrite)
        self._renewing = threading.Lock()  # the renewal thread's and confirm()'s rewrites
        self._warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def take(
        cls,
        folder: Path,
        beat: float,
        say: Callable[[str], None] | None = None,
        place: Place = RUN_DIR,
        dead: Sequence[dict[str, Any]] = (),
    ) -> RunLock:
        """Take ``folder``'s lock, or raise :class:`UserError` naming the live run that holds it.

        Args:
            folder: the run directory, or a checkpoint folder outside it (made if missing).
            beat: seconds between this run's renewals of its lock.
            say: prints a line while watching a lock whose holder may be alive (default: stderr).
            place: :data:`RUN_DIR` or :data:`CHECKPOINT_DIR`, for the messages.
            dead: holders already found dead (by :func:`take_all`, at the run directory): a lock of theirs
                is taken over without watching it again.
        """
        lock = cls(folder / NAME, beat, place)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not lock._create():
                lock._contend(say or (lambda line: print(line, file=sys.stderr, flush=True)), dead)
        except OSError as exc:
            raise UserError(f"{lock.place.where}: cannot take the lock {lock.path}: {exc}") from None
        lock._confirmed = time.monotonic()
        lock._thread = threading.Thread(target=lock._renew, name="hpcngd-run-lock", daemon=True)
        lock._thread.start()
        return lock

    def _create(self) -> bool:
        """Make the lock file with this run's contents; False if there is one already."""
        try:
            self._fill(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        return True

    def _read_or_create(self) -> tuple[bytes, dict[str, Any]] | None:
        """Another's lock as :func:`_read` gives it, or None when it was gone and this run made its own."""
        try:
            return _read(self.path)
        except FileNotFoundError:  # its holder ended just now
            return None if self._create() else _read(self.path)

    def _contend(self, say: Callable[[str], None], dead: Sequence[dict[str, Any]] = ()) -> None:
        """Another lock is there: refuse if its holder lives, else take it over."""
        found = self._read_or_create()
        if found is None:
            return
        raw, holder = found
        beat = holder.get("beat_s")
        if isinstance(beat, bool) or not isinstance(beat, (int, float)) or beat <= 0:
            beat = self.beat  # unknown (a file midway through a write): this run's own
        wait = WATCHED_BEATS * beat
        poll = min(1.0, wait / 10)
        if not _certainly_gone(holder, self.me) and not any(_same_process(holder, d) for d in dead):
            say(
                f"hpcngd: {self.path} is held by {_describe(holder)}; watching it for {wait:g} s to see "
                "whether that run is alive"
            )
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                time.sleep(poll)
                found = self._read_or_create()
                if found is None:
                    return
                now, renewed = found
                if now != raw:
                    raise self._in_use(renewed or holder)
        self._write()
        # Another newcomer may have judged the same lock dead in the same moment and written it too: the
        # file keeps the last write. Both read it back after two polls (more than the spread of their
        # decisions), and only the run it names goes on.
        time.sleep(2 * poll)
        now_holder = self._read_back(poll)
        if now_holder.get("token") != self.me["token"]:
            raise self._in_use(now_holder)
        self.taken_from = holder
        self.notes.append(
            f"took over {self.path} from a run that ended without removing it ({_describe(holder)})"
        )

    def _read_back(self, poll: float) -> dict[str, Any]:
        """The lock as it reads after this run wrote it; a read that fails is tried for 3 more polls (an
        error here would refuse this run after it wrote its token: both contenders could end)."""
        for _ in range(3):
            try:
                return _read(self.path)[1]
            except OSError:
                time.sleep(poll)
        return _read(self.path)[1]

    def _in_use(self, holder: dict[str, Any]) -> UserError:
        key, what, holds = self.place.key, self.place.what, self.place.holds
        return UserError(
            f"{key}: {what} {self.path.parent} is in use by another run ({_describe(holder)}; it renews "
            f"{self.path}): two runs there would mix their {holds}; wait for it to end, or give this run "
            f"another {key}"
        )

    def _write(self) -> None:
        """Rewrite the lock in place with the next counter (readers compare its bytes)."""
        self._fill(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))

    def _fill(self, fd: int) -> None:
        """Write this run's contents over the file open at ``fd``, durably, and close it."""
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.me))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())

    def held(self) -> bool:
        """Whether the lock file still names this run (it may have been taken over while this run stalled:
        a suspended job). Raises OSError when the file cannot be read (not when it is gone)."""
        try:
            return _read(self.path)[1].get("token") == self.me["token"]
        except FileNotFoundError:
            return False

    def _renew(self) -> None:
        while not self._stop.wait(self.beat) and not self.lost:
            self._renew_once()

    def _renew_once(self) -> None:
        """Rewrite the lock if it still names this run; set ``lost`` if it does not."""
        with self._renewing:
            if self.lost:
                return
            checked = time.monotonic()
            try:
                if not self.held():
                    self.lost = True  # the trainer stops every rank at its next step
                    return
                self.me["beats"] += 1
                self._write()
            except OSError as exc:
                self.error = exc
                if not self._warned:  # a file system hiccup: keep trying; a watcher may take the lock over
                    print(f"hpcngd: warning: cannot renew {self.path}: {exc}", file=sys.stderr, flush=True)
                    self._warned = True
                return
            self._confirmed, self.error = checked, None

    def confirm(self, strict: bool = False) -> bool:
        """Whether the lock is still this run's, and will be for at least one more beat.

        A newcomer takes a lock over only after it saw it unchanged for 3 beats, so a lock renewed less
        than 2 beats ago is surely this run's for one more: then this costs nothing. After a longer
        stall (the job was suspended) it renews the lock now, or finds it taken and sets ``lost``. While
        the file cannot be read it answers True (the renewals keep trying; the run goes on), unless
        ``strict``: a checkpoint writer about to publish needs a real answer, and gets False.
        """
        if not self.lost and self._stale():
            self._renew_once()
        return not self.lost and not (strict and self._stale())

    def _stale(self) -> bool:
        """Whether the lock was last seen to name this run 2 beats ago or more (a third one may be enough
        for a newcomer to take it over)."""
        return time.monotonic() - self._confirmed >= (WATCHED_BEATS - 1) * self.beat

    def lost_message(self) -> str:
        """Why a run whose lock was taken from it (or cannot be read to tell) stops."""
        if not self.lost:
            return (
                f"{self.place.key}: cannot tell whether {self.path} still names this run ({self.error}): "
                "stopping without publishing the checkpoint"
            )
        try:
            holder = _describe(_read(self.path)[1])
        except FileNotFoundError:
            holder = "removed"
        except OSError as exc:
            holder = f"unreadable: {exc}"
        return (
            f"{self.place.key}: {self.path} no longer names this run (now: {holder}): another run took "
            f"over {self.place.what} while this one did not renew it for {WATCHED_BEATS} x run.lock_renew_s "
            "(suspended?); stopping without a checkpoint"
        )

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.held():
                self.path.unlink()
        except OSError as exc:
            print(f"hpcngd: warning: cannot remove {self.path}: {exc}", file=sys.stderr, flush=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_all(places: list[tuple[Path, Place]], beat: float) -> list[RunLock]:
    """The locks of several folders (the run directory first), or none: one that cannot be taken
    releases those taken before it and raises."""
    taken: list[RunLock] = []
    try:
        for folder, place in places:
            dead = [lock.taken_from for lock in taken if lock.taken_from is not None]
            taken.append(RunLock.take(folder, beat, place=place, dead=dead))
    except BaseException:
        for lock in reversed(taken):
            lock.release()
        raise
    return taken
