#!/bin/bash
# Full run of the ModelZoo launch scripts (the Ascend port's test/train_full_8p.sh): trains EPOCHS (24) epochs on RANK_SIZE
# devices, evaluates the last EMA checkpoint with the official nuScenes devkit, then prints
#   Final Performance images/sec : <FPS>        FPS = batch_size * RANK_SIZE / mean(last 50 step_time), 4 decimals
#   E2E Training Duration sec : <seconds>
#   mAP / mATE / mASE / mAOE / mAVE / mAAE / NDS
# and writes test/output/0/<CaseName>.log with the run facts AND the metrics (the seed overwrote them).
# Run from the repo root, from test/, or from anywhere:
#   bash test/train_full_8p.sh
# Environment overrides (defaults = the seed's 8-device NPU run):
#   RANK_SIZE=8  EXP=<MatrixVT exp>  DATA_ROOT=<exp default>  VERSION=<exp default>  EPOCHS=24  BATCH_SIZE=8
#   LEARNING_RATE=0.000003125 (per image)  ACCELERATOR=npu if torch_npu works, else auto
#   PRECISION=16 on NPU/GPU, 32 on CPU  EXTRA_ARGS='<more training flags>'  EVAL_EXTRA_ARGS='<more eval flags>'
#   OUTPUT_DIR=test/output/0 (logs)  RUN_DIR=outputs/<EXP_NAME of the exp> (--default_root_dir)
#   BIND_CPU_CORES=1 on NPU, else 0 (1 adds --bind_cpu_cores: each rank on its own block of CPU cores)
# The evaluated checkpoint is <RUN_DIR>/lightning_logs/version_N/<EPOCHS-1>.pth of the version folder this
# run created (the seed assumed version_0 and set the path only when ./outputs already existed).

default_epochs=24
# shellcheck source=common_8p.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common_8p.sh"
EVAL_EXTRA_ARGS=${EVAL_EXTRA_ARGS:-}
read -r -a eval_extra_args <<< "$EVAL_EXTRA_ARGS"

# Version folders that exist before training: the one to evaluate is the newest folder not in this list.
list_version_dirs() {  # newest (highest N) first
    local dir
    for dir in "$RUN_DIR"/lightning_logs/version_*; do
        [ -d "$dir" ] && echo "${dir##*/version_} $dir"
    done | sort -n -r | cut -d' ' -f2-
}
versions_before=$(list_version_dirs)
run_training
report_performance

# The newest version_N folder that this training run created (not an older run's, not assumed version_0).
run_version_dir=""
while IFS= read -r version_dir; do
    if [ -n "$version_dir" ] && ! grep -qxF "$version_dir" <<< "$versions_before"; then
        run_version_dir=$version_dir
        break
    fi
done <<< "$(list_version_dirs)"
ckpt_path=$run_version_dir/$((train_epochs - 1)).pth
if [ -z "$run_version_dir" ] || [ ! -f "$ckpt_path" ]; then
    echo "error: EMA checkpoint $((train_epochs - 1)).pth of this run not found (looked in '${run_version_dir:-$RUN_DIR/lightning_logs/<new version_N>}'); check $train_log" >&2
    exit 1
fi

echo "evaluating $ckpt_path, log $OUTPUT_DIR/result.log"
python3 "$EXP" \
    -e \
    --ckpt_path "$ckpt_path" \
    --seed 0 \
    --learning_rate "$learning_rate" \
    --amp_backend native \
    --accelerator "$ACCELERATOR" \
    --devices "$RANK_SIZE" \
    --precision "$PRECISION" \
    --batch_size_per_device "$batch_size" \
    --default_root_dir "$RUN_DIR" \
    "${bind_args[@]}" "${data_args[@]}" "${eval_extra_args[@]}" > "$OUTPUT_DIR/result.log" 2>&1
eval_status=$?
if [ "$eval_status" -ne 0 ]; then
    tail -n 20 "$OUTPUT_DIR/result.log" >&2
    echo "error: evaluation failed with exit code $eval_status; full log: $OUTPUT_DIR/result.log" >&2
    exit "$eval_status"
fi
# Not anchored at the line start: the devkit's progress bar (stderr, same log) can precede "mAP: ..." on its line.
metric_lines=$(grep -oE '\b(mAP|mATE|mASE|mAOE|mAVE|mAAE|NDS):[[:space:]]*[0-9]+(\.[0-9]+)?' "$OUTPUT_DIR/result.log" | tail -n 7)
for metric in mAP mATE mASE mAOE mAVE mAAE NDS; do
    if ! grep -q "^$metric:" <<< "$metric_lines"; then
        echo "error: no '$metric: <value>' line in $OUTPUT_DIR/result.log: the evaluation output is incomplete" >&2
        exit 1
    fi
done
echo "$metric_lines"

write_case_log acc "$metric_lines"
