#!/usr/bin/env bash
# The GPU checks, in one go on a one-GPU machine (results: benchmarks/RESULTS.md, "On a GPU"):
#   0. tests/moe/test_moe_cuda.py (skipped on machines without a GPU): grouped GEMM and a bf16 model
#      step against float32 references;
#   1. benchmarks/moe_layer.py in bf16 on CUDA, at 4096 and 16384 tokens;
#   2. one pretraining run through the platform (jobs/pretrain.py: Ray Train, DeepSpeed ZeRO-1,
#      nccl, bf16) of a 1.37B-parameter MoE (0.46B active: d=1536, 16 layers, 8 experts top-2,
#      expert_hidden 2048), whose progress lines give tokens/s and MFU.
#
#     bash benchmarks/gpu_checks.sh DATASET_DIR OUT_DIR [STEPS]
#
# DATASET_DIR: a prepared dataset with data.seq_len=1024, e.g.
#     python jobs/prepare.py data.seq_len=1024 data.max_bytes=6000000 data.dataset_dir=DATASET_DIR
# Uses the Ray cluster in RAY_ADDRESS, else starts a head on this machine and stops it at the end.
# RUN_DIR (default /tmp/gpu_checks_run) holds the run. PEAK_FLOPS (default 989e12, the H100/H200 datasheet's dense bf16) is the MFU denominator.
set -uo pipefail
DATASET_DIR=${1:?usage: gpu_checks.sh DATASET_DIR OUT_DIR [STEPS]}
OUT_DIR=${2:?usage: gpu_checks.sh DATASET_DIR OUT_DIR [STEPS]}
STEPS=${3:-120}
PEAK_FLOPS=${PEAK_FLOPS:-989e12}
# The run's checkpoint (~20 GB: bf16 weights, fp32 master weights and Adam moments) goes here, not to OUT_DIR.
RUN_DIR=${RUN_DIR:-/tmp/gpu_checks_run}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, ray, deepspeed; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)" \
    | tee -a "$OUT_DIR/gpu.txt"

echo "== tests/moe/test_moe_cuda.py"
(cd "$HERE" && python3 -m pytest -q -p no:cacheprovider tests/moe/test_moe_cuda.py 2>&1) | tee "$OUT_DIR/cuda_tests.txt" | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

for tokens in 4096 16384; do
    echo "== moe_layer, bf16, $tokens tokens"
    timeout 240 python3 "$HERE/benchmarks/moe_layer.py" --dtype bf16 --device cuda --tokens "$tokens" \
        2>&1 | tee "$OUT_DIR/moe_layer_bf16_${tokens}.txt" | grep -v "^\[" | tail -32
done

started_ray=""
if [ -z "${RAY_ADDRESS:-}" ]; then
    ray start --head --num-gpus=1 --include-dashboard=false --disable-usage-stats > "$OUT_DIR/ray_start.txt" 2>&1 \
        || { tail -20 "$OUT_DIR/ray_start.txt"; exit 1; }
    export RAY_ADDRESS=127.0.0.1:6379
    started_ray=1
fi

echo "== pretrain, 1.37B MoE, bf16 + nccl, $STEPS steps"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 > "$OUT_DIR/memory_mib.txt" &
sampler=$!
timeout 420 python3 "$HERE/jobs/pretrain.py" \
    "data.dataset_dir=$DATASET_DIR" "run.output_dir=$RUN_DIR" run.export=false \
    model.seq_len=1024 model.d_model=1536 model.n_layers=16 model.n_heads=12 model.ffn_hidden=4096 \
    model.moe.num_experts=8 model.moe.top_k=2 model.moe.expert_hidden=2048 \
    trainer.use_gpu=true trainer.precision=bf16 trainer.micro_batch_size=16 trainer.lr=3e-4 \
    "trainer.max_steps=$STEPS" trainer.warmup_steps=20 trainer.log_every=10 trainer.report_every=10 \
    trainer.eval_every=0 trainer.eval_batches=4 "trainer.checkpoint_every=$STEPS" \
    "trainer.peak_flops_per_worker=$PEAK_FLOPS" > "$OUT_DIR/pretrain.txt" 2>&1
status=$?
kill "$sampler"
grep -E "step |param|rror" "$OUT_DIR/pretrain.txt" | tail -40
echo "pretrain exit $status, wall $SECONDS s since the script started," \
    "peak GPU memory $(sort -n "$OUT_DIR/memory_mib.txt" | tail -1) MiB"
[ -n "$started_ray" ] && ray stop > /dev/null 2>&1
exit $status
