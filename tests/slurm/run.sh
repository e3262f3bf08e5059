#!/bin/bash
# A real one-node Slurm cluster on this machine runs scripts/slurm/quickstart.sbatch (called by .ci/run).
#   bash tests/slurm/run.sh        (as root, after `make test` built .venv and `make` wrote data/demo)
# 1. the quickstart job with 2 tasks completes, writes metrics.jsonl and reports validation accuracy;
# 2. a job that gets the warning signal (USR1 to the batch shell, as --signal=B:USR1@T sends it) writes a
#    checkpoint, exits 3 and requeues itself; the requeued job resumes from the checkpoint and completes.
# Installs slurm-wlm and munge from Debian when missing; skips with a message where that is impossible.
# The daemons are stopped at the end, whatever happens.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "slurm test: installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; } || true
  fi
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "SKIPPED slurm test: needs root and Debian's slurm-wlm and munge, which cannot be installed here"
  exit 0
fi

WORK=$(mktemp -d /tmp/hpcngd-slurm.XXXXXX)
export SLURM_CONF=$WORK/slurm.conf
HOST=$(hostname -s)
PIDS=()
cleanup() {
  rc=$?
  scancel --quiet --full --signal=KILL -u root 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    echo "slurm test FAILED; daemon and job logs:"
    tail -n 30 "$WORK"/*.log "$ROOT"/hpcngd-slurmtest-*.out 2>/dev/null || true
  fi
  rm -rf "$WORK" "$ROOT"/out/slurmtest-* "$ROOT"/hpcngd-slurmtest-*.out
  exit "$rc"
}
trap cleanup EXIT

mkdir -p "$WORK"/{munge,state,spool}
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
munged --force --foreground --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/socket" \
  --pid-file="$WORK/munge/pid" --log-file="$WORK/munge.log" --seed-file="$WORK/munge/seed" \
  >"$WORK/munged.log" 2>&1 &
PIDS+=($!)
cat > "$SLURM_CONF" <<CONF
ClusterName=hpcngd-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/socket
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
NodeName=$HOST CPUs=$(nproc) RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
for _ in $(seq 50); do [ -S "$WORK/munge/socket" ] && break; sleep 0.1; done
slurmctld -D -i >"$WORK/slurmctld.out.log" 2>&1 &
PIDS+=($!)
slurmd -D >"$WORK/slurmd.out.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do sinfo -h -o %t 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo -h -o "%P %t %D %c" | grep -q idle || { echo "slurm test: the node never became idle"; exit 1; }
echo "slurm test: one-node cluster up ($(sinfo -h -o '%c CPUs, state %t'))"

[ -d data/demo/val ] || .venv/bin/hpcngd data demo data/demo >/dev/null
HPCNGD_VENV=$ROOT/.venv
export HPCNGD_VENV

state() { scontrol show job "$1" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
wait_state() {  # job, wanted states (regex), timeout in s
  for _ in $(seq "$3"); do
    [[ "$(state "$1")" =~ ^($2)$ ]] && return 0
    sleep 1
  done
  echo "slurm test: job $1 is $(state "$1"), expected $2"; return 1
}

# 1. The quickstart script, 2 tasks, two epochs.
SECONDS=0
job=$(sbatch --parsable --job-name=slurmtest-quick scripts/slurm/quickstart.sbatch \
  --set run.name=slurmtest-quick --set run.epochs=2)
wait_state "$job" "COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL" 300
out=hpcngd-slurmtest-quick-$job.out
[ "$(state "$job")" = COMPLETED ] || { echo "slurm test: quickstart job $job ended $(state "$job")"; cat "$out"; exit 1; }
grep -q '"kind": "eval"' out/slurmtest-quick/metrics.jsonl
grep -q '"val_top1"' out/slurmtest-quick/metrics.jsonl
grep -q "2 ranks on 1 node (2 per node)" "$out"
grep -q "done: 47 steps, final val_top1" "$out"  # 2 epochs of 3,000 images, batch 128
echo "slurm test: quickstart job $job COMPLETED in ${SECONDS} s: $(grep -o 'final val_top1 [0-9.]*%' "$out")"
SECONDS=0

# 2. The warning signal: checkpoint, exit 3, requeue, resume, complete.
job=$(sbatch --parsable --job-name=slurmtest-signal scripts/slurm/quickstart.sbatch \
  --set run.name=slurmtest-signal --set run.epochs=4 --set log.every_steps=1)
out=hpcngd-slurmtest-signal-$job.out
metrics=out/slurmtest-signal/metrics.jsonl
for _ in $(seq 240); do [ -f "$metrics" ] && [ "$(grep -c '"train"' "$metrics")" -ge 3 ] && break; sleep 0.5; done
echo "slurm test: job $job trains (${SECONDS} s); sending it the warning signal"
scancel --batch --signal=USR1 "$job"
for _ in $(seq 120); do grep -q "requeueing" "$out" 2>/dev/null && break; sleep 1; done
echo "slurm test: job $job asked to be requeued (${SECONDS} s)"
grep -q "stopped by SIGUSR1 at step" "$out"
grep -q "hpcngd job: exit 3" "$out"
ls out/slurmtest-signal/checkpoints/ckpt-*.h5 >/dev/null
wait_state "$job" "PENDING|REQUEUED" 60
# Slurm keeps a requeued job ineligible for about two minutes (its BeginTime); shorten that here, but
# not to 0: slurmd refuses a relaunch in the second its old credential was revoked.
scontrol update JobId="$job" StartTime=now+3
wait_state "$job" "COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL" 300
[ "$(state "$job")" = COMPLETED ] || { echo "slurm test: signalled job $job ended $(state "$job")"; exit 1; }
restarts=$(scontrol show job "$job" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
[ "$restarts" -ge 1 ]
grep -q "resuming from .*out/slurmtest-signal/checkpoints/ckpt-" "$out"
grep -q "done: 94 steps" "$out"
echo "slurm test: signalled job $job checkpointed, exited 3, was requeued ($restarts restart) and resumed to COMPLETED (${SECONDS} s)"
echo "slurm test: PASSED"
