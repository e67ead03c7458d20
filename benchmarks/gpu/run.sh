#!/usr/bin/env bash
# Issue #7's accelerator measurements in one run: MFU of the train steps (UNet, DiT-B/2) and the
# side-by-side PyTorch comparisons, every figure with its machine and versions (JSON lines).
#
#   bash benchmarks/gpu/fetch_wheels.sh          # here, once: .whl/ (ml-collections, diffusers)
#   device run: command "bash benchmarks/gpu/run.sh", carry [".whl"], timeout_s 540
#
# Each step has its own time limit and a failing step does not stop the others. Results go to
# $OUT (the device tool's return folder; ./gpu_out elsewhere): results.jsonl (one JSON line per
# benchmark) and log.txt (everything printed). GPU_RUN_SMALL=1 runs the same steps at toy sizes
# (a check of the script on a CPU machine; its figures mean nothing).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jaxdiff_site .whl/*.whl && export PYTHONPATH=/tmp/jaxdiff_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# jax and torch share the GPU inside one process in mfu.py and the side-by-side scripts
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
J=$OUT/results.jsonl
LOG=$OUT/log.txt

if [ "${GPU_RUN_SMALL:-0}" = 1 ]; then
  B_UNET=2 B_DIT=2 B_SAMPLE=2 R=1 W=1 T=600 N=512
else
  B_UNET=128 B_DIT=256 B_SAMPLE=16 R=10 W=3 T=1 N=8192
fi

step() {  # step SECONDS command...: run with a time limit, keep its output, report its status
  local limit=$1; shift
  echo "== $(date -u '+%F %T') [limit ${limit}s] $*" | tee -a "$LOG"
  timeout "$limit" "$@" --json "$J" >>"$LOG" 2>&1
  local rc=$?
  grep -v '^{' "$LOG" | tail -n 4
  echo "== rc=$rc" | tee -a "$LOG"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
torch.cuda.is_available())"; } 2>&1 | tee -a "$LOG"

# 1-2. What issue #7 asks for on an accelerator: MFU of the UNet and DiT-B/2 train steps (bf16
# compute, float32 parameters and AdamW state), against the measured bf16 matmul peak.
step $((140 * T)) python3 benchmarks/mfu.py --model unet-cifar10 --batch $B_UNET --dtype bfloat16 \
  --repeats $R --warmup $W --matmul-n $N
step $((110 * T)) python3 benchmarks/mfu.py --model dit-b2 --batch $B_DIT --dtype bfloat16 \
  --repeats $R --warmup $W --matmul-n $N --skip-torch
# 3. Training side by side: the benchmark UNet (common.UNET), PyTorch on the same GPU, bf16.
step $((110 * T)) python3 benchmarks/training_vs_torch.py --batch $B_UNET --dtype bfloat16 \
  --repeats $R --warmup $W
# 4. Sampling side by side, the issue's configuration (DPM-Solver++(2M), 20 steps, batch 16).
step $((110 * T)) python3 benchmarks/sampling_vs_diffusers.py --models unet,dit --batch $B_SAMPLE \
  --dtype bfloat16 --repeats 3
echo "done $(date -u '+%F %T')" | tee -a "$LOG"
