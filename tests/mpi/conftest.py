"""MPI tests run unchanged under ``mpiexec -n 1``, ``-n 2`` and ``-n 4`` with ``--with-mpi``."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mpi4py import MPI


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.mpi)


@pytest.fixture
def comm() -> Iterator[MPI.Comm]:
    """A private duplicate of the world communicator, freed after the test."""
    dup = MPI.COMM_WORLD.Dup()
    yield dup
    dup.Free()


@pytest.fixture
def folder(comm: MPI.Comm) -> Iterator[Path]:
    """One temporary folder that every rank sees."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hpcngd-ckpt-") if comm.rank == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path)
