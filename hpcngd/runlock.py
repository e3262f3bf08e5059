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

This is a guard against mistakes, not a lock manager: two newcomers taking over one dead run's lock in
the same moment both run until the first renewal. A holder that finds its lock taken (it was suspended
for 3 beats, or the lock was overwritten) sets ``lost``, and the trainer stops every rank at the next
step without a checkpoint (exit 2).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class RunLock:
    """The lock of one run directory, held by rank 0 from start-up to the end of the run.

    Use :meth:`take`; then ``with lock:`` releases it at the end. ``notes`` says what taking it found.
    """

    def __init__(self, path: Path, beat: float) -> None:
        self.path = path
        self.beat = beat
        self.me = {**_identity(), "token": uuid.uuid4().hex, "beat_s": beat, "beats": 0}
        self.notes: list[str] = []
        self.lost = False  # set when another run took the lock over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def take(cls, run_dir: Path, beat: float, say: Callable[[str], None] | None = None) -> RunLock:
        """Take ``run_dir``'s lock, or raise :class:`UserError` naming the live run that holds it.

        Args:
            run_dir: the run directory (made if missing).
            beat: seconds between this run's renewals of its lock.
            say: prints a line while watching a lock whose holder may be alive (default: stderr).
        """
        lock = cls(run_dir / NAME, beat)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not lock._create():
                lock._contend(say or (lambda line: print(line, file=sys.stderr, flush=True)))
        except OSError as exc:
            raise UserError(f"run.output_dir: cannot take the lock {lock.path}: {exc}") from None
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

    def _contend(self, say: Callable[[str], None]) -> None:
        """Another lock is there: refuse if its holder lives, else take it over."""
        found = self._read_or_create()
        if found is None:
            return
        raw, holder = found
        if not _certainly_gone(holder, self.me):
            beat = holder.get("beat_s")
            if isinstance(beat, bool) or not isinstance(beat, (int, float)) or beat <= 0:
                beat = self.beat  # unknown (a file midway through a write): this run's own
            wait = WATCHED_BEATS * beat
            say(
                f"hpcngd: {self.path} is held by {_describe(holder)}; watching it for {wait:g} s to see "
                "whether that run is alive"
            )
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                time.sleep(min(1.0, wait / 10))
                found = self._read_or_create()
                if found is None:
                    return
                now, renewed = found
                if now != raw:
                    raise UserError(
                        f"run.name: the run directory {self.path.parent} is in use by another run "
                        f"({_describe(renewed or holder)}; it renews {self.path}): two runs there would "
                        "mix their metrics and checkpoints; wait for it to end, or give this run another "
                        "run.name"
                    )
        self.notes.append(
            f"took over {self.path} from a run that ended without removing it ({_describe(holder)})"
        )
        self._write()

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
        warned = False
        while not self._stop.wait(self.beat):
            try:
                if not self.held():
                    self.lost = True  # the trainer stops every rank at its next step
                    return
                self.me["beats"] += 1
                self._write()
            except OSError as exc:
                if not warned:  # a file system hiccup: keep trying; a watcher may take the lock over
                    print(f"hpcngd: warning: cannot renew {self.path}: {exc}", file=sys.stderr, flush=True)
                    warned = True

    def lost_message(self) -> str:
        """Why a run whose lock was taken from it stops."""
        try:
            holder = _describe(_read(self.path)[1])
        except OSError:
            holder = "removed"
        return (
            f"run.name: {self.path} no longer names this run (now: {holder}): another run took over the run "
            f"directory while this one did not renew it for {WATCHED_BEATS} x run.lock_renew_s (suspended?); "
            "stopping without a checkpoint"
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
