"""Wall time of the per-rank part of a checkpoint (random generators and counts) at thousands of ranks.

    python benchmarks/rank_states.py                       # 1,024 and 4,096 ranks
    python benchmarks/rank_states.py --ranks 256 16384 --repeats 5

Rank 0 writes every rank's state after gathering it (about 18 kB a rank on CPU) and reads it all back on
resume, so this part grows with the world size while the rest of a checkpoint does not. One process
does here what rank 0 does there, with real generator states: write a checkpoint holding only this part
(commit: close, seal, fsync, rename), then open it (SHA-256 and structure check) and read it back. Both
layouts are timed in the same run: schema 2's one dataset per key, a row per rank (what hpcngd writes),
and schema 1's one group per rank (what it wrote before, and still reads). The MPI gather and scatter
are not timed. Prints median seconds and the file's dataset count and size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hpcngd import state
from hpcngd.checkpoint import Reader, Writer
from hpcngd.metrics import NGD_COUNTS


def write(folder: Path, states: list[dict[str, Any]], schema: int) -> Path:
    w = Writer(folder, len(states), {"world_size": len(states), "schema_version": schema})
    if schema == 2:
        state.write_rank_states(w, states)
    else:  # schema 1's layout, for comparison
        for r, s in enumerate(states):
            for key, arr in s.items():
                w.put(f"ranks/{r}/{key}", arr)
    return w.commit(keep_last=1)


def read(path: Path) -> int:
    with Reader(path) as reader:
        return len(state.read_rank_states(reader))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    mine = state.rank_state(torch.Generator().manual_seed(1), dict.fromkeys(NGD_COUNTS, 3))  # one rank's
    print(f"one rank's state: {sum(a.nbytes for a in mine.values()):,} bytes in {len(mine)} arrays")
    with tempfile.TemporaryDirectory(prefix="hpcngd-bench-") as tmp:
        for n in args.ranks:
            states = [mine] * n
            for schema in (2, 1):
                folder = Path(tmp) / f"{n}-{schema}"
                writes, reads = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    path = write(folder, states, schema)
                    t1 = time.perf_counter()
                    assert read(path) == n
                    reads.append(time.perf_counter() - t1)
                    writes.append(t1 - t0)
                with Reader(path) as reader:
                    count = len(reader.names(""))
                layout = "a row per rank" if schema == 2 else "a group per rank"
                print(
                    f"{n:>6} ranks, schema {schema} ({layout}): "
                    f"write {statistics.median(writes):.3f} s, open + read {statistics.median(reads):.3f} s "
                    f"(medians of {args.repeats}); {count:,} datasets, {path.stat().st_size / 2**20:.1f} MiB"
                )


if __name__ == "__main__":
    main()
