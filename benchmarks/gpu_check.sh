#!/usr/bin/env bash
# One command for a one-GPU machine: the CUDA checks and GPU figures of the trainer, in at most ~8 minutes.
#
#     bash benchmarks/gpu_check.sh [OUTPUT_FILE]      # default: gpu_check-<host>-<UTC time>.log
#
# Set-up is the README's (`make .venv/.synced`: the locked environment; nothing else is installed). Parts, each
# under its own time limit (the limits add up to 470 s), every line also written to OUTPUT_FILE:
#   1. the environment: GPU, driver, torch/CUDA/cuDNN/NCCL versions, DeepSpeed;
#   2. the `cuda`-marked tests (tests/test_cuda.py): device placement through the trainer, a bf16 step against
#      fp32, ZeroLearner at world size 1 on NCCL, h on CUDA against the CPU in fp32 (1e-4 relative), and a
#      checkpoint round trip with the CUDA RNG state;
#   3. benchmarks/mpl_step.py --device cuda: WRN-28-2, B=64, mu=7, eager/compiled x fp32/bf16 (step time,
#      images/s, MFU against the GPU's dense peak) in the trainer's CUDA layout (contiguous), then the eager bf16
#      step channels-last: the measurement `mpl_large.build.CHANNELS_LAST` waits for on CUDA;
#   4. an EfficientNet-B4 pair at 380 px in bf16, channels-last, eager then compiled;
#   5. 20 steps of the CIFAR-10-4K recipe on generated images, through the trainer.
# A part that fails or runs out of time is reported and the script goes on; the exit status is the number of
# failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).log}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export THP_MEM_ALLOC_ENABLE=1
PY=.venv/bin/python
failed=0

log() { echo "$@" | tee -a "$OUT"; }

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, output to the terminal and $OUT
  local name=$1 limit=$2
  shift 2
  log ""
  log "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT"
  local rc=${PIPESTATUS[0]}
  log "=== $name: exit $rc after $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (time limit)')"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

: >"$OUT"
log "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
make -s .venv/.synced >/dev/null || { log "make .venv/.synced failed"; exit 1; }

part "environment" 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  $PY -c 'import torch, deepspeed; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", \
torch.backends.cudnn.version(), \"nccl\", torch.cuda.nccl.version(), \"deepspeed\", deepspeed.__version__); \
print(\"device\", torch.cuda.get_device_name(), torch.cuda.get_device_capability(), \"count\", torch.cuda.device_count())'"

part "cuda tests" 90 $PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --durations=0

part "WRN-28-2 B=64 mu=7: eager/compiled x fp32/bf16" 100 \
  $PY benchmarks/mpl_step.py --device cuda --labeled-batch 64 --mu 7 --matrix --warmup 3 --iters 10

part "WRN-28-2 B=64 mu=7: eager bf16, channels-last" 40 \
  $PY benchmarks/mpl_step.py --device cuda --labeled-batch 64 --mu 7 --modes cosine --precision bf16 \
  --channels-last --no-compile --warmup 3 --iters 10

part "EfficientNet-B4 pair 380px bf16 eager" 50 \
  $PY benchmarks/mpl_step.py --device cuda --model efficientnet_b4 --image-size 380 --labeled-batch 16 --mu 1 \
  --modes cosine --precision bf16 --channels-last --no-compile --warmup 2 --iters 5

part "EfficientNet-B4 pair 380px bf16 compiled" 80 \
  $PY benchmarks/mpl_step.py --device cuda --model efficientnet_b4 --image-size 380 --labeled-batch 16 --mu 1 \
  --modes cosine --precision bf16 --channels-last --compile --warmup 2 --iters 5

$PY -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from images import image_folder; \
image_folder(Path('$WORK/train'), 1024, classes=10); image_folder(Path('$WORK/test'), 256, classes=10, seed=1)"
part "CIFAR-10-4K recipe, 20 steps on generated images" 50 \
  $PY recipes/cifar10_4k.py --data "$WORK/train" --eval "$WORK/test" --out "$WORK/cifar" --steps 20 \
  --finetune-steps 0 --no-progress --set data.num_labeled=256 --set data.num_dropped=0 --set log_every=5

log ""
log "gpu_check done: $failed failed part(s); output in $OUT"
exit "$failed"
