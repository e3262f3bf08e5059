"""MPI tests run unchanged under ``mpiexec -n 1``, ``-n 2`` and ``-n 4`` with ``--with-mpi``."""

from __future__ import annotations

from collections.abc import Iterator

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
