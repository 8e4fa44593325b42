#!/usr/bin/env bash
# GPU figures of l2b in under 5 minutes on one H100 (run from the repository root, no install needed):
#   bash benchmarks/gpu_check.sh
# Sections are independent: one failing (or timing out) prints FAILED and the others still run.
# Needs torch with CUDA, numpy, tqdm, PyYAML. Prints everything to stdout.
set -u
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
BUDGET=${BUDGET:-285}  # seconds for the whole script
WORK=$(mktemp -d)
START=$(date +%s)

section() {  # section NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 10 )); then echo "=== $name: SKIPPED (wall-clock budget spent)"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  if (( rc != 0 )); then echo "=== $name: FAILED (exit $rc$( ((rc == 124)) && echo ', timed out'))"; fi
  echo "=== $name: $(( $(date +%s) - t0 )) s"
}

section "environment" 30 $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"

# step-time ratios, PreActResNet-18, n = m = 512, bf16, channels-last (target: exact <= 2.5x CE)
section "bench step (bf16, channels-last)" 90 $PY -m l2b bench step --device cuda --model preact-resnet18 \
  --batch-size 512 --val-batch-size 512 --amp bf16 --channels-last --steps 10 --json
section "bench step (fp32 baseline)" 60 $PY -m l2b bench step --device cuda --model preact-resnet18 \
  --batch-size 512 --val-batch-size 512 --amp off --steps 5 --no-reference

# a whole epoch over 50,000 random 3x32x32 images (target: L2B <= 15 s)
section "bench epoch 50k (bf16, channels-last)" 120 $PY -m l2b bench epoch --device cuda --model preact-resnet18 \
  --num-images 50000 --batch-size 512 --val-batch-size 512 --amp bf16 --channels-last --methods ce,l2b_exact,l2b_fd

# meta-weight agreement with exact float32 (Pearson, sign agreement, relative L1)
section "bench weights (bf16 vs fp32, fd vs exact)" 45 $PY -m l2b bench weights --device cuda \
  --model preact-resnet18 --batch-size 512 --val-batch-size 512 --amp bf16

# a short training run on the GPU (Fashion-MNIST if installed, else a random-data epoch)
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "${L2B_DATA:-}" ]; then
  section "train smoke (cuda, 2 epochs, 2000 images, bf16 + fd)" 75 $PY -m l2b train --device cuda --epochs 2 \
    --warmup-epochs 1 --subset 2000 --amp bf16 --meta-grad fd --quiet --out "$WORK/run-cuda"
  section "train smoke, DDP path (torchrun, 1 rank, nccl)" 75 $PY -m torch.distributed.run --standalone \
    --nproc_per_node 1 -m l2b train --device cuda --epochs 2 --warmup-epochs 1 --subset 2000 --quiet --out "$WORK/run-ddp"
  ls "$WORK"/run-* 2>/dev/null
else
  echo "=== Fashion-MNIST not found: random-data epoch instead of the training runs"
  section "random-data epoch (small-cnn)" 60 $PY -m l2b bench epoch --device cuda --num-images 5000 --batch-size 256
fi
echo "=== total $(( $(date +%s) - START )) s"
rm -rf "$WORK"
