#!/usr/bin/env bash
# The quick-start demo: install, write the synthetic nuScenes dataroot, gen_info, gen_depth_gt, train the tiny
# MatrixVT on CPU, evaluate it with the official nuScenes devkit, draw pictures. About 10-15 minutes on 2 cores.
#
# Environment overrides: DEMO_DATA (dataroot, default data/synthetic_nuscenes), DEMO_EPOCHS, DEMO_WORKERS,
# DEMO_SAMPLES_PER_SCENE (key frames per synthetic scene, default 20),
# DEMO_OUT (run folder, default outputs/demo), DEMO_SKIP_INSTALL=1 (use the current environment as it is),
# DEMO_ACCELERATOR (cpu|gpu|npu|auto, default cpu), DEMO_PRECISION (32|bf16; default bf16 on a CPU with AMX, else 32).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DEMO_DATA:-data/synthetic_nuscenes}
EPOCHS=${DEMO_EPOCHS:-}
WORKERS=${DEMO_WORKERS:-2}
SAMPLES=${DEMO_SAMPLES_PER_SCENE:-20}
ACCELERATOR=${DEMO_ACCELERATOR:-cpu}
EXP=exps/nuscenes/tiny/matrixvt_tiny_synthetic.py
OUT=${DEMO_OUT:-outputs/demo}
step() { printf '\n==== %s (at %ds) ====\n' "$*" "$SECONDS"; }
SECONDS=0

if [ "${DEMO_SKIP_INSTALL:-0}" != 1 ]; then
    step "1/6 install the project (pinned torch/torchvision, see requirements-ci.txt)"
    python -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
fi

step "2/6 write the synthetic nuScenes dataroot: $DATA"
if [ -f "$DATA/v1.0-mini/sample.json" ]; then
    echo "$DATA exists: reusing it (delete it to regenerate)"
else
    python scripts/make_synthetic_nuscenes.py --dataroot "$DATA" --version v1.0-mini --seed 0 --scenes-per-split 8 \
        --samples-per-scene "$SAMPLES" --workers "$WORKERS"
fi

step "3/6 gen_info (mini_train -> train, mini_val -> val) and gen_depth_gt"
python scripts/gen_info.py --dataroot "$DATA" --version v1.0-mini --out "$DATA"
python scripts/gen_depth_gt.py --dataroot "$DATA" --workers "$WORKERS" --splits train

# bf16 pays on CPUs with AMX (Intel Sapphire Rapids and later: the amx_bf16 flag); elsewhere bf16 arithmetic is
# emulated or narrow and a step is slower than fp32, so the demo trains in fp32 there. DEMO_PRECISION overrides.
if [ -z "${DEMO_PRECISION:-}" ]; then
    if [ "$ACCELERATOR" = cpu ] && grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null; then
        DEMO_PRECISION=bf16
        echo "precision: bf16 (this CPU has AMX: amx_bf16)"
    else
        DEMO_PRECISION=32
        echo "precision: fp32 (no AMX bf16 on this CPU, or not a CPU run)"
    fi
fi

step "4/6 train the tiny MatrixVT on $ACCELERATOR in precision $DEMO_PRECISION (EMA weights saved per epoch as <epoch>.pth)"
EPOCH_FLAG=()
[ -n "$EPOCHS" ] && EPOCH_FLAG=(--max_epochs "$EPOCHS")
python "$EXP" --data_root "$DATA" --version v1.0-mini --accelerator "$ACCELERATOR" --progress_bar on \
    --precision "$DEMO_PRECISION" --default_root_dir "$OUT" "${EPOCH_FLAG[@]}"
RUN_DIR=$(ls -dt "$OUT"/lightning_logs/version_* | head -n 1)
EMA_CKPT=$(ls "$RUN_DIR"/*.pth | sort -V | tail -n 1)
echo "run directory: $RUN_DIR; EMA weights: $EMA_CKPT"

step "5/6 evaluate $EMA_CKPT with the official nuScenes devkit (mini_val)"
python "$EXP" -e --ckpt_path "$EMA_CKPT" --data_root "$DATA" --version v1.0-mini --accelerator "$ACCELERATOR" \
    --precision "$DEMO_PRECISION" --progress_bar on --default_root_dir "$RUN_DIR"
python scripts/plot_pr_curves.py --results "$RUN_DIR/results_nusc.json" --data_root "$DATA" --version v1.0-mini \
    --out_dir "$RUN_DIR/pr_curves"

step "6/6 draw cameras + BEV with GT and predicted boxes"
python scripts/visualize_nusc.py --data_root "$DATA" --version v1.0-mini --split val \
    --results "$RUN_DIR/results_nusc.json" --count 3 --out_dir "$RUN_DIR/pictures"

echo
echo "demo finished in ${SECONDS}s"
echo "  metrics:   $RUN_DIR/metrics_summary.json (printed above by the devkit)"
echo "  PR curves: $RUN_DIR/pr_curves/"
echo "  pictures:  $RUN_DIR/pictures/"
echo "  TensorBoard: tensorboard --logdir $OUT"
