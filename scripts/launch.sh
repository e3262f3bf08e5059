# Shared by the Slurm and PBS scripts: the environment, the launch, the stop signal and the requeue.
# Sourced, not run. No logic of hpcngd's lives here: only what a batch job needs around `hpcngd RUN`.
#
#   HPCNGD_VENV   a virtual environment to activate (default: ./.venv when it exists; else use the
#                 environment sbatch/qsub exported, e.g. after `spack env activate .`)
#   RUN           the run file (each script sets its preset)
#
# The scheduler's warning signal (USR1, sent to this shell before the wall time) is passed on to the
# launcher, which passes it to every rank; hpcngd then writes a checkpoint and exits 3, and the job is
# requeued; the requeued job resumes from that checkpoint (checkpoint.resume = "auto").

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-${PBS_O_WORKDIR:-$PWD}}" || exit 1
if [ -n "${HPCNGD_VENV:-}" ]; then
  source "$HPCNGD_VENV/bin/activate"
elif [ -f .venv/bin/activate ]; then
  source .venv/bin/activate
fi
# Open MPI: one rank per core and no pinning surprises inside an allocation; root only in containers/CI.
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-0}
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# Slurm >= 22.05: srun no longer inherits the job's --cpus-per-task, so each rank would get one core
# (torch threads, data workers and MPI progress on it); pass it on unless the user set it.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
fi

EXIT_STOPPED=3  # hpcngd: stopped by SIGTERM/SIGUSR1 after writing a checkpoint (README, "Exit codes")

requeue() {
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
  elif [ -n "${PBS_JOBID:-}" ]; then
    # Some PBS sites let only operators rerun jobs: then resubmit the same qsub line, it resumes.
    qrerun "$PBS_JOBID" || echo "hpcngd job: qrerun refused; resubmit the same qsub command to continue"
  fi
}

launch() {
  echo "hpcngd job ${SLURM_JOB_ID:-${PBS_JOBID:-}} on $(hostname) at $(date -Is): $*"
  local pid="" rc early=""
  # Trapped before the launch: a signal that comes first is passed on once the launcher runs.
  trap 'echo "hpcngd job: warning signal, passing USR1 to the ranks"; if [ -n "$pid" ]; then kill -USR1 "$pid"; else early=1; fi' USR1 TERM
  "$@" &
  pid=$!
  [ -z "$early" ] || kill -USR1 "$pid"
  wait "$pid"; rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # `wait` returns early (128 + signal) when a trapped signal arrives
    wait "$pid"; rc=$?
  done
  if [ "$rc" -gt 128 ]; then  # the launcher may have ended during an interrupted wait: ask for its status
    wait "$pid" 2>/dev/null && rc=0 || { r=$?; [ "$r" = 127 ] || rc=$r; }
  fi
  echo "hpcngd job: exit $rc at $(date -Is)"
  if [ "$rc" = "$EXIT_STOPPED" ]; then
    echo "hpcngd job: stopped after a checkpoint; requeueing"
    requeue
  fi
  exit "$rc"
}
