"""SP-NGD math (the SP-NGD issue): pure functions and per-layer state, no MPI."""
