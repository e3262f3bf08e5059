"""Checkpoint files: one HDF5 file per checkpoint, written atomically, read without executing anything.

No MPI and no torch here (``hpcngd inspect`` needs neither); what goes into a checkpoint and how ranks
gather it is :mod:`hpcngd.state`'s business.

Layout of a checkpoint folder::

    ckpt-000001200.h5    complete checkpoints, named by the step they hold (steps done)
    latest               the name of the newest complete one (one line)
    .ckpt-*.tmp          a checkpoint being written, named by its writer (or left by a writer that
                         died: ignored; the next run removes it when it starts, see remove_leftovers)
    *.corrupt            a checkpoint found unreadable at resume, set aside

Atomicity: the writer fills a temporary file in the same folder, flushes and fsyncs it, renames it to
its final name and fsyncs the folder; ``latest`` is replaced the same way; only then are checkpoints
beyond ``keep_last`` removed. A crash at any point leaves every earlier checkpoint complete. A writer
touches no temporary file but its own, and it may be told to check, just before it publishes, that the
folder is still its run's (a run suspended mid-write whose folder was taken over must not publish).

Integrity: the file's first 512 bytes are an HDF5 user block (HDF5 skips it) holding the SHA-256 and
size of the rest of the file, written after HDF5 closed it. The reader compares them before HDF5 parses
a byte, so any damage since the write (truncation, a flipped bit anywhere, metadata included) is found,
and HDF5 never meets a damaged header (one such bit flip made it loop forever). A file that starts with
neither a seal nor HDF5's signature is damaged. Files that start with the signature (written by an
earlier hpcngd, without the block) are read with the per-dataset checksums alone.

Contents: numeric datasets (bool, integer, float; each non-empty one carries a Fletcher-32 checksum)
and attributes (numbers, strings), in HDF5's latest file format (its object headers carry checksums).
A file holding anything else (object, opaque or compound types, soft or external links, external or
virtual datasets, filters other than Fletcher-32) is refused before any of it is read, so a pickled
payload is never deserialised and no other file is ever opened.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from hpcngd.errors import CheckpointError
from hpcngd.metrics import clock_phrase


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose bytes are damaged (truncated, checksum mismatch): resume = auto skips it."""


class NotPublished(CheckpointError):
    """The writer's run no longer holds the folder: the checkpoint was dropped, nothing else touched."""


FORMAT = "hpcngd-checkpoint"
# 3: epochs of N images, steps from one data stream (1 and 2: N // B steps an epoch); 2: per-rank state
# stacked, one dataset per key (1: one group per rank)
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
NAME = re.compile(r"ckpt-(\d{9})\.h5")
LATEST = "latest"
# Test hook: "STEP:N" makes the writer of the checkpoint of STEP kill itself (SIGKILL) after N datasets;
# "STEP:N:STOP" stops it there (SIGSTOP: a job suspended mid-write) until it gets SIGCONT.
CRASH_HOOK = "HPCNGD_TEST_CRASH_IN_SAVE"
_WRITE_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)  # what h5py raises on failure
# What h5py raises reading a damaged file; which one depends on the damaged structure (KeyError for a
# group whose metadata fails its checksum, SystemError when HDF5 fails inside a visiting callback).
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SystemError)


USER_BLOCK = 512  # bytes before HDF5's superblock: the seal
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # a file without a user block starts with it
_SEAL = re.compile(rb"hpcngd-checkpoint sha256 ([0-9a-f]{64}) bytes (\d+)\n\0*")


def _sha256_after_user_block(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and length of ``path`` past its user block."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(USER_BLOCK)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def seal(path: Path) -> None:
    """Write the SHA-256 and size of a closed checkpoint file into its user block."""
    digest, size = _sha256_after_user_block(path)
    block = f"hpcngd-checkpoint sha256 {digest} bytes {size}\n".encode().ljust(USER_BLOCK, b"\0")
    with open(path, "r+b") as f:
        f.write(block)


def check_seal(path: Path) -> bool:
    """Whether ``path`` carries a seal (False: an earlier hpcngd's file, HDF5 from its first byte);
    CorruptCheckpoint if the file is not what was sealed, or if neither a seal nor HDF5 starts it (a
    damaged seal must not let HDF5 parse a file that may be damaged elsewhere too)."""
    try:
        with open(path, "rb") as f:
            block = f.read(USER_BLOCK)
        if block.startswith(HDF5_SIGNATURE):
            return False
        found = _SEAL.fullmatch(block)
        if found is None:
            raise CorruptCheckpoint(
                f"checkpoint {path}: not an hpcngd checkpoint, or its seal (the first {USER_BLOCK} bytes) "
                "is damaged"
            )
        digest, size = _sha256_after_user_block(path)
    except OSError as exc:
        raise CorruptCheckpoint(f"checkpoint {path}: not readable: {exc}") from None
    written = int(found.group(2))
    if size != written:
        raise CorruptCheckpoint(
            f"checkpoint {path}: truncated or extended: {size:,} bytes, {written:,} written"
        )
    if digest != found.group(1).decode():
        raise CorruptCheckpoint(f"checkpoint {path}: damaged since it was written (its SHA-256 differs)")
    return True


def _crash_after(step: int) -> tuple[int, signal.Signals]:
    """The dataset count after which the test hook signals the writer of ``step`` (-1: never), and how."""
    wanted, _, rest = os.environ.get(CRASH_HOOK, "").partition(":")
    count, _, how = rest.partition(":")
    sig = signal.SIGSTOP if how == "STOP" else signal.SIGKILL
    return (int(count) if wanted == str(step) and count.isdigit() else -1), sig


_NUMERIC = "biuf"
_REQUIRED_ATTRS = ("format", "schema_version", "step", "created")


def file_name(step: int) -> str:
    return f"ckpt-{step:09d}.h5"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _replace_durably(tmp: Path, final: Path) -> None:
    _fsync_file(tmp)  # a no-op when the caller has just done it
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def candidates(directory: Path) -> list[Path]:
    """The checkpoint files in ``directory``, highest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resume_order(directory: Path) -> list[Path]:
    """Where to resume from, best first: the one ``latest`` names, then the others, highest step first.

    ``latest`` decides because the newest checkpoint is not always the highest step (a run resumed
    from an older checkpoint, or with another batch size, writes lower step numbers).
    """
    found = candidates(directory)
    name = _pointer_text(directory / LATEST) or ""  # none, or damaged: the highest step comes first
    first = [p for p in found if p.name == name]
    return first + [p for p in found if p.name != name]


def _pointer_text(path: Path) -> str | None:
    """What the ``latest`` pointer ``path`` says (a checkpoint's file name, unless damaged), or None when
    it cannot be one: unreadable, not UTF-8, 256 bytes or more, or the start of a checkpoint file."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
        if len(head) == 256 or head.startswith(HDF5_SIGNATURE) or _SEAL.match(head):
            return None
        return head.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def followed(path: Path) -> Path:
    """``path``, or where it points if it is a ``latest`` pointer: a short text file that names a
    checkpoint in its folder (a checkpoint file someone named ``latest`` is taken as it is)."""
    if path.name != LATEST or not path.is_file():
        return path
    name = _pointer_text(path)
    if name is None:  # not a pointer (or unreadable): the Reader says what it is
        return path
    if not NAME.fullmatch(name):
        raise CheckpointError(f"checkpoint {path}: the {LATEST} pointer names {name[:80]!r}, not a ckpt-*.h5")
    return path.parent / name


def step_of(path: Path) -> int:
    m = NAME.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def remove_leftovers(directory: Path) -> list[Path]:
    """Remove the temporary files of writers that died (call it when a run starts, holding the folder)."""
    if not directory.is_dir():
        return []
    found = sorted(directory.glob(".ckpt-*.tmp")) + sorted(directory.glob(f".{LATEST}*.tmp"))
    for path in found:
        path.unlink(missing_ok=True)
    return found


def _private(path: Path) -> Path:
    """A temporary name for ``path`` that no other writer uses: ``.NAME.HOST-PID-RANDOM.tmp``."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}.tmp")


def set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint to ``NAME.corrupt`` so that resume never picks it again."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    return target


class Writer:
    """Writes one checkpoint into ``directory`` atomically (one process: the writing rank).

    Errors (a full disk, a vanished folder) do not escape ``put``/``fill``: the first one is kept and
    later calls do nothing, so a caller that is feeding data received from other ranks can drain them
    and report the failure collectively; :meth:`commit` raises it.
    """

    def __init__(self, directory: Path, step: int, attrs: dict[str, Any], expected_bytes: int = 0) -> None:
        """``expected_bytes``: about what the arrays will take; with less space free nothing is written
        (HDF5 meeting a full disk mid-file can crash the process when it closes the file)."""
        self.directory = directory
        self.step = step
        self.final = directory / file_name(step)
        self.tmp = _private(self.final)
        self.error: str | None = None
        self.datasets = 0
        self.file: h5py.File | None = None
        self._crash_after = _crash_after(step)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(directory).free
            needed = int(1.02 * expected_bytes) + 2**20  # with HDF5's metadata and checksums
            if free < needed:
                self.error = (
                    f"cannot write checkpoint {self.final}: {free / 2**20:,.1f} MiB free there, it needs "
                    f"about {needed / 2**20:,.1f} MiB"
                )
                return
            self.file = h5py.File(self.tmp, "w", locking=False, libver="latest", userblock_size=USER_BLOCK)
            self.file.attrs.update(
                {"format": FORMAT, "schema_version": SCHEMA_VERSION, "step": step, "created": time.time()}
            )
            self.file.attrs.update(attrs)
        except _WRITE_ERRORS as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"cannot write checkpoint {self.final}: {type(exc).__name__}: {exc}"

    def put(self, name: str, array: np.ndarray, **attrs: Any) -> None:
        """Store ``array`` (numeric) as dataset ``name``, with optional attributes."""
        self.create(name, array.shape, array.dtype, **attrs)
        self.fill(name, 0, array)

    def put_stacked(self, name: str, arrays: list[np.ndarray]) -> None:
        """Store equally shaped ``arrays`` as the rows of one dataset ``name`` (one per rank)."""
        if self.file is None or self.error:
            return
        try:
            stacked = np.stack(arrays)
        except ValueError as exc:  # unequal shapes: a failure like any other, agreed at commit
            self._fail(exc)
            return
        self.put(name, stacked)

    def create(self, name: str, shape: tuple[int, ...], dtype: Any, **attrs: Any) -> None:
        """An empty dataset to be filled by rows with :meth:`fill` (data gathered piece by piece)."""
        if self.file is None or self.error:
            return
        if np.dtype(dtype).kind not in _NUMERIC:
            raise TypeError(f"checkpoint entry {name}: {dtype} is not numeric")
        try:
            filtered = {"fletcher32": True} if len(shape) and int(np.prod(shape)) else {}
            ds = self.file.create_dataset(name, shape=shape, dtype=dtype, **filtered)
            ds.attrs.update(attrs)
        except _WRITE_ERRORS as exc:
            self._fail(exc)

    def fill(self, name: str, first_row: int, rows: np.ndarray) -> None:
        if self.file is None or self.error:
            return
        try:
            if rows.ndim == 0:
                self.file[name][()] = rows
            elif rows.size:
                self.file[name][first_row : first_row + len(rows)] = rows
        except _WRITE_ERRORS as exc:
            self._fail(exc)
            return
        self.datasets += 1
        if self.datasets == self._crash_after[0]:
            self.file.flush()
            os.kill(os.getpid(), self._crash_after[1])

    def set_attrs(self, group: str, **attrs: Any) -> None:
        """Attributes of a group, created if needed."""
        if self.file is None or self.error:
            return
        try:
            self.file.require_group(group).attrs.update(attrs)
        except _WRITE_ERRORS as exc:
            self._fail(exc)

    def commit(self, keep_last: int, still_ours: Callable[[], bool] | None = None) -> Path:
        """Make the checkpoint durable and visible, point ``latest`` at it, then prune old ones.

        ``still_ours``: asked just before the file is published, again before ``latest`` moves (a stall in
        between: a suspended job, a slow file system) and before pruning; False drops the file
        (:class:`NotPublished`) and leaves the folder as it was (another run holds it now). Past the move
        of ``latest`` it only stops the pruning.
        """

        def ours() -> None:
            if still_ours is not None and not still_ours():
                raise NotPublished(f"checkpoint {self.final} not published: the folder is another run's now")

        try:
            if self.file is not None:
                f, self.file = self.file, None
                f.close()  # HDF5 writes its metadata here: a full disk often shows now
            if self.error:
                raise CheckpointError(self.error)
            seal(self.tmp)
            _fsync_file(self.tmp)
            ours()
            _replace_durably(self.tmp, self.final)
            try:
                ours()
            except NotPublished:
                self.final.unlink(missing_ok=True)  # nothing points to it yet
                raise
            pointer = _private(self.directory / LATEST)
            pointer.write_text(self.final.name + "\n", encoding="utf-8")
            _replace_durably(pointer, self.directory / LATEST)
            ours()
            older = [p for p in candidates(self.directory) if step_of(p) < self.step]
            for p in older[keep_last - 1 :]:
                p.unlink()
        except CheckpointError:  # first: it is a ValueError too
            self.abort()
            raise
        except _WRITE_ERRORS as exc:
            self._fail(exc)
            self.abort()
            raise CheckpointError(self.error or str(exc)) from None
        return self.final

    def abort(self) -> None:
        """Drop the temporary file (the previous checkpoints are untouched); keeps the first error."""
        try:
            if self.file is not None:
                f, self.file = self.file, None
                f.close()
            if self.tmp.exists():
                self.tmp.unlink()
        except _WRITE_ERRORS as exc:
            self._fail(exc)


def header(path: Path) -> dict[str, Any]:
    """A checkpoint's top-level attributes, read without checking its bytes: cheap, for telling whose it
    is, not for loading it. Raises OSError or ValueError when the file cannot be read as HDF5."""
    with h5py.File(path, "r", locking=False) as f:
        return {k: _plain(v) for k, v in f.attrs.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Reader:
    """An opened, structurally checked checkpoint (read-only).

    Raises :class:`CheckpointError` naming the file if it is not a readable HDF5 file, is not an
    hpcngd checkpoint, has another schema version, or holds anything but numbers and strings.
    """

    def __init__(self, path: Path) -> None:
        path = followed(path)
        self.path = path
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path}: a folder; name a ckpt-*.h5 file in it")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: no such file")
        self.sealed = check_seal(path)
        try:
            self.file = h5py.File(path, "r", locking=False)
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(
                f"checkpoint {path}: not readable (truncated or not HDF5): {exc}"
            ) from None
        try:
            self._check()
        except CheckpointError:
            self.file.close()
            raise
        self.attrs = self.group_attrs("/")
        self.step = int(self.attrs["step"])

    def fail(self, why: str, corrupt: bool = False) -> CheckpointError:
        return (CorruptCheckpoint if corrupt else CheckpointError)(f"checkpoint {self.path}: {why}")

    def _check(self) -> None:
        try:
            fmt = _plain(self.file.attrs.get("format"))
            version = _plain(self.file.attrs.get("schema_version"))
        except (*_READ_ERRORS, TypeError) as exc:
            raise self.fail(f"unreadable header: {exc}", corrupt=True) from None
        if fmt != FORMAT:
            raise self.fail(f"not an hpcngd checkpoint (format attribute {fmt!r})")
        missing = [a for a in _REQUIRED_ATTRS if a not in self.file.attrs]
        if missing:
            raise self.fail(f"header lacks {', '.join(missing)}", corrupt=True)
        if version not in READABLE_SCHEMAS:
            readable = f"{READABLE_SCHEMAS[0]} to {READABLE_SCHEMAS[-1]}"
            raise self.fail(f"schema version {version}; this hpcngd reads versions {readable}")
        problems: list[str] = []

        def visit(name: str, link: h5py.HardLink | h5py.SoftLink | h5py.ExternalLink) -> None:
            if not isinstance(link, h5py.HardLink):
                problems.append(f"{name} is a {type(link).__name__}")
                return
            obj = self.file[name]
            if isinstance(obj, h5py.Dataset):
                if obj.dtype.kind not in _NUMERIC:
                    problems.append(f"{name} has type {obj.dtype}")
                if obj.external or obj.is_virtual:
                    problems.append(f"{name} points to other files")
                plist = obj.id.get_create_plist()
                filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
                if filters - {h5py.h5z.FILTER_FLETCHER32}:
                    problems.append(f"{name} uses filters {sorted(filters)}")
            problems.extend(f"{name}@{a}" for a in _bad_attrs(obj))

        try:
            problems.extend(f"/@{a}" for a in _bad_attrs(self.file))
            self.file.visititems_links(visit)
        except _READ_ERRORS as exc:
            raise self.fail(f"corrupted structure: {exc}", corrupt=True) from None
        if problems:
            raise self.fail(
                f"holds entries that are not numbers or strings ({', '.join(problems[:3])}); "
                "refusing to load it (checkpoints hold only numeric arrays)"
            )

    def verify(self) -> None:
        """Read every dataset once, so that a checksum or truncation error shows before any use (a
        sealed file's bytes were all checked when it was opened)."""
        if self.sealed:
            return
        for name in self.names(""):
            self.array(name)

    def names(self, group: str) -> list[str]:
        """Dataset names under ``group`` (recursive, full paths)."""
        found: list[str] = []
        try:
            root = self.file[group] if group else self.file
            root.visititems(
                lambda n, o: (
                    found.append(f"{root.name}/{n}".lstrip("/")) if isinstance(o, h5py.Dataset) else None
                )
            )
        except _READ_ERRORS as exc:
            raise self.fail(f"corrupted structure under /{group}: {exc}", corrupt=True) from None
        return found

    def has(self, name: str) -> bool:
        try:
            return name in self.file
        except _READ_ERRORS as exc:
            raise self.fail(f"corrupted structure at {name}: {exc}", corrupt=True) from None

    def array(self, name: str) -> np.ndarray:
        return self.rows(name, None, None)

    def rows(self, name: str, first: int | None, stop: int | None) -> np.ndarray:
        """Rows ``first:stop`` of dataset ``name`` (all of it when both are None)."""
        try:
            ds = self.file[name]
            return np.asarray(ds[()] if first is None and stop is None else ds[first:stop])
        except _READ_ERRORS as exc:  # a missing entry too: this format and version always write it
            raise self.fail(f"corrupted data in {name}: {exc}", corrupt=True) from None

    def group_attrs(self, name: str) -> dict[str, Any]:
        try:
            return {k: _plain(v) for k, v in self.file[name].attrs.items()}
        except _READ_ERRORS as exc:
            raise self.fail(f"corrupted attributes of {name}: {exc}", corrupt=True) from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _bad_attrs(obj: h5py.HLObject) -> Iterator[str]:
    for key in obj.attrs:
        dtype = obj.attrs.get_id(key).dtype
        if dtype.kind not in _NUMERIC + "S" and h5py.check_string_dtype(dtype) is None:
            yield key


def describe(path: Path) -> str:
    """What ``hpcngd inspect`` prints: header, sizes per group, the run file."""
    with Reader(path) as r:
        a = r.attrs
        sizes: dict[str, list[int]] = {}
        for name in r.names(""):
            top = name.split("/")[0]
            entry = sizes.setdefault(top, [0, 0])
            entry[0] += 1
            entry[1] += r.file[name].nbytes
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["created"]))
        lines = [
            f"{r.path}: hpcngd checkpoint, schema {a['schema_version']}, written by hpcngd "
            f"{a.get('hpcngd_version')} at {created}",
            f"step {a['step']} (epoch {a.get('epoch')}) | {a.get('world_size')} rank(s) on "
            f"{a.get('num_nodes')} node(s)"
            f" | model {a.get('arch')}, global batch {a.get('batch_size')}",
            *_clock_lines(a),
            f"{'group':<10} {'arrays':>7} {'MiB':>10}",
            *(f"{g:<10} {n:>7} {b / 2**20:>10.2f}" for g, (n, b) in sorted(sizes.items())),
            f"{'total':<10} {sum(n for n, _ in sizes.values()):>7} "
            f"{sum(b for _, b in sizes.values()) / 2**20:>10.2f}"
            f"   (file {path.stat().st_size / 2**20:.2f} MiB, "
            + ("SHA-256 checked)" if r.sealed else "no SHA-256 seal: written by an earlier hpcngd)"),
            "run file:",
            str(a.get("run_file", "")).rstrip(),
        ]
    return "\n".join(lines)


def _clock_lines(a: dict[str, Any]) -> list[str]:
    """The run's clock and time to target in a header (an older hpcngd wrote none)."""
    if not isinstance(a.get("train_s"), float) or not isinstance(a.get("elapsed_s"), float):
        return []
    target, step = a.get("target_top1"), a.get("target_step")
    reached = (
        f"; target top1 {target:g}% reached at step {step}"
        if target and step is not None and step >= 0
        else ""
    )
    return [f"clock: {clock_phrase(a['train_s'], a['elapsed_s'])}{reached}"]
