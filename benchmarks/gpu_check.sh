#!/usr/bin/env bash
# The GPU checks, in one go on a CUDA machine (each step time-limited; a failing step does not stop the next):
#   1. the GPU tests (`pytest -m gpu`: fused SDPA vs eager in fp32/bf16/fp16, bf16 training step and generation,
#      Lightning fit under DDP and FSDP with bf16-mixed, 16-mixed and bf16-mixed fits, torch.compile on CUDA);
#   2. the main job (configs/shapes.yaml, TensorBoard logger) on the GPU with bf16-mixed;
#   3. benchmarks/vs_coca.py on the GPU in bf16 (generation with and without the CUDA graph, training against
#      open_clip's CoCa), then the training step of both models compiled;
#   4. benchmarks/encoder_speed.py on the GPU in bf16 (CAT-T vs timm ViT-S/16 and ViT-Ti/16), eager and compiled;
#   5. configs/gpu_ddp.yaml as shipped (fast_dev_run, smaller data, no logger).
# Steps past DEADLINE seconds after the start are cut short or skipped.
# Usage: bash benchmarks/gpu_check.sh OUTDIR [DEADLINE]   (python3 must import torch with CUDA and our deps;
# PY=... selects another interpreter; STEPS="tests vs_coca ..." runs only the named steps: tests main_job vs_coca
# vs_coca_compiled encoder encoder_compiled gpu_ddp). One log per step (the last 30 lines also printed) and the
# last attention map PNG of the main job go to OUTDIR: up to 9 files.
set -u
OUTDIR=${1:-gpu_check_out}
DEADLINE=${2:-540}
PY=${PY:-python3}
STEPS=${STEPS:-tests main_job vs_coca vs_coca_compiled encoder encoder_compiled gpu_ddp}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline
T0=$(date +%s)

step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, log to OUTDIR/NAME.log, print rc, time and tail
    local name=$1 limit=$2 start rc left
    shift 2
    if [[ " $STEPS " != *" $name "* ]]; then
        return
    fi
    left=$((DEADLINE - ($(date +%s) - T0)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: skipped (deadline)"
        return
    fi
    echo "== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - start))s"
    tail -n "${TAIL:-30}" "$OUTDIR/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, pytorch_lightning as pl, timm, open_clip; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', pl.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__, 'gpu', torch.cuda.get_device_name())"
    command -v java || echo "no java (captions scored without the PTB tokenizer, no METEOR)"
} 2>&1 | tee "$OUTDIR/env.log"

step tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 200 tests/test_gpu.py tests/test_finetune.py
step main_job 240 $PY train.py fit --config configs/shapes.yaml --config configs/shapes_tensorboard.yaml \
    --trainer.accelerator=gpu --trainer.precision=bf16-mixed --data.init_args.num_workers=4
TAIL=14 step vs_coca 90 $PY benchmarks/vs_coca.py --device cuda --bf16 --repeats 3 --json
TAIL=4 step vs_coca_compiled 150 $PY benchmarks/vs_coca.py --device cuda --bf16 --compile --skip gen,memory \
    --repeats 5 --warmup 2
step encoder 90 $PY benchmarks/encoder_speed.py --device cuda --bf16 --batches 1,32
step encoder_compiled 120 $PY benchmarks/encoder_speed.py --device cuda --bf16 --compile --sizes 224,896 \
    --batches 1,32
step gpu_ddp 45 $PY train.py fit --config configs/gpu_ddp.yaml --trainer.logger=false --trainer.fast_dev_run=3 \
    --data.init_args.train_size=1024 --data.init_args.val_size=256 --data.init_args.test_size=256 \
    --data.init_args.cache_dir=/tmp/gpu_ddp_cache --trainer.default_root_dir=/tmp/gpu_ddp_run
png=$(find runs/shapes -name '*.png' 2>/dev/null | sort | tail -n 1)
[ -n "$png" ] && cp "$png" "$OUTDIR/attention_last.png"
echo "== total $(($(date +%s) - T0))s"
