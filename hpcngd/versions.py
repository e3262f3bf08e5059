"""The oldest torch and h5py that hpcngd runs with, checked before a command uses them.

pip enforces pyproject.toml's floors, but a cluster's own torch (spack, an environment module, a
container, ``pip install --no-deps``) bypasses them, and an older one would fail far into a run:
h5py < 3.11 lacks ``Group.visititems_links`` (every checkpoint read); torch 2.1 lacks ``Tensor.all``
over several dimensions (SP-NGD's BatchNorm blocks) and fp16 autocast on a CPU, 2.2 the CPU kernel of
loss-scale unscaling, 2.3 ``torch.OutOfMemoryError`` (the compiled BatchNorm statistic's fallback).
``tests/unit/test_deploy.py`` keeps :data:`MINIMUM` equal to pyproject.toml's floors.
"""

from __future__ import annotations

import importlib
import re

from hpcngd.errors import UserError

MINIMUM = {"torch": (2, 4), "h5py": (3, 11)}


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.4.0a0+git3bcc3cd" (an NGC container's torch, a
    pre-release of 2.4.0 that has 2.4's API) -> (2, 4, 0); "2.13.0+cpu" -> (2, 13, 0)."""
    found = re.match(r"\d+(\.\d+)*", version)
    if not found:
        raise UserError(f"cannot read the version {version!r}")
    return tuple(int(part) for part in found.group().split("."))


def check(*names: str) -> None:
    """One UserError naming the first of ``names`` (keys of MINIMUM) that is older than its floor."""
    for name in names:
        version = importlib.import_module(name).__version__
        floor = MINIMUM[name]
        if release(version) < floor:
            wanted = ".".join(map(str, floor))
            raise UserError(
                f"{name} {version} is older than hpcngd needs ({name} >= {wanted}); "
                f"install a newer one (pip install '{name}>={wanted}')"
            )
