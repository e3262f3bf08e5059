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


def release(version: str) -> tuple[int, ...] | None:
    """The release numbers of a version string, None if it has none: "2.13.0+cpu" -> (2, 13, 0);
    "2.4.0a0+git3bcc3cd" (an NGC container's torch) -> (2, 4, 0), taken as 2.4 where pip's ">=2.4"
    would refuse it (untested; such builds are 2.4 but for their last commits)."""
    found = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in found.group().split(".")) if found else None


def check(*names: str) -> None:
    """One UserError naming the first of ``names`` (keys of MINIMUM) that is older than its floor. A
    build whose version has no release numbers ("unknown") is not refused: nothing says it is older."""
    for name in names:
        version = str(getattr(importlib.import_module(name), "__version__", ""))
        floor, found = MINIMUM[name], release(version)
        if found is not None and found < floor:
            wanted = ".".join(map(str, floor))
            raise UserError(
                f"{name} {version} is older than hpcngd needs ({name} >= {wanted}); "
                f"install a newer one (pip install '{name}>={wanted}')"
            )
