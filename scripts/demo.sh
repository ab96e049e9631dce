#!/usr/bin/env bash
# The quick-start demo: install, write the synthetic nuScenes dataroot, gen_info, gen_depth_gt, train the tiny
# MatrixVT on CPU, evaluate it with the official nuScenes devkit, draw pictures. About 10-15 minutes on 2 cores.
#
# Environment overrides: DEMO_DATA (dataroot, default data/synthetic_nuscenes), DEMO_EPOCHS, DEMO_WORKERS,
# DEMO_SKIP_INSTALL=1 (use the current environment as it is), DEMO_ACCELERATOR (cpu|gpu|npu|auto, default cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DEMO_DATA:-data/synthetic_nuscenes}
EPOCHS=${DEMO_EPOCHS:-}
WORKERS=${DEMO_WORKERS:-2}
ACCELERATOR=${DEMO_ACCELERATOR:-cpu}
EXP=exps/nuscenes/tiny/matrixvt_tiny_synthetic.py
EXP_NAME=matrixvt_tiny_synthetic
step() { printf '\n==== %s ====\n' "$*"; }
SECONDS=0

if [ "${DEMO_SKIP_INSTALL:-0}" != 1 ]; then
    step "1/6 install the project (pinned torch/torchvision, see requirements-ci.txt)"
    python -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
fi

step "2/6 write the synthetic nuScenes dataroot: $DATA"
if [ -f "$DATA/v1.0-mini/sample.json" ]; then
    echo "$DATA exists: reusing it (delete it to regenerate)"
else
    python scripts/make_synthetic_nuscenes.py --dataroot "$DATA" --version v1.0-mini --seed 0 --scenes-per-split 8
fi

step "3/6 gen_info (mini_train -> train, mini_val -> val) and gen_depth_gt"
python scripts/gen_info.py --dataroot "$DATA" --version v1.0-mini --out "$DATA"
python scripts/gen_depth_gt.py --dataroot "$DATA" --workers "$WORKERS" --splits train

step "4/6 train the tiny MatrixVT on $ACCELERATOR"
EPOCH_FLAG=()
[ -n "$EPOCHS" ] && EPOCH_FLAG=(--max_epochs "$EPOCHS")
RUN_MARK=$(mktemp)
python "$EXP" --data_root "$DATA" --version v1.0-mini --accelerator "$ACCELERATOR" "${EPOCH_FLAG[@]}"
RUN_DIR=$(ls -dt outputs/$EXP_NAME/lightning_logs/version_* | head -n 1)
EMA_CKPT=$(ls "$RUN_DIR"/*.pth | sort -V | tail -n 1)
echo "run directory: $RUN_DIR; EMA weights: $EMA_CKPT"

step "5/6 evaluate $EMA_CKPT with the official nuScenes devkit (mini_val)"
python "$EXP" -e --ckpt_path "$EMA_CKPT" --data_root "$DATA" --version v1.0-mini --accelerator "$ACCELERATOR"

step "6/6 draw cameras + BEV with GT and predicted boxes"
RESULTS=$(ls -t outputs/$EXP_NAME/lightning_logs/version_*/results_nusc.json 2>/dev/null | head -n 1)
python scripts/visualize_nusc.py --dataroot "$DATA" --version v1.0-mini --results "$RESULTS" \
    --num-samples 3 --out "$RUN_DIR/pictures"
rm -f "$RUN_MARK"
echo
echo "demo finished in ${SECONDS}s: metrics, PR curves and pictures are under $RUN_DIR"
