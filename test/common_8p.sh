#!/bin/bash
# Shared part of test/train_full_8p.sh and test/train_performance_8p.sh, sourced by them (not run on its own):
# settings from the environment, the device probe, the training run, the FPS / E2E lines and the case log.
# The sourcing script sets default_epochs first; see its header for the environment overrides.
# shellcheck disable=SC2034  # variables set here are used by the sourcing scripts

test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cur_path=$(dirname "$test_path_dir")
cd "$cur_path" || exit 1

export RANK_SIZE=${RANK_SIZE:-8}
EXP=${EXP:-exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py}
DATA_ROOT=${DATA_ROOT:-}
VERSION=${VERSION:-}
train_epochs=${EPOCHS:-$default_epochs}
batch_size=${BATCH_SIZE:-8}
learning_rate=${LEARNING_RATE:-0.000003125}
EXTRA_ARGS=${EXTRA_ARGS:-}
Network="MatrixVT_for_PyTorch"
ASCEND_DEVICE_ID=0
OUTPUT_DIR=${OUTPUT_DIR:-$test_path_dir/output/$ASCEND_DEVICE_ID}
train_log=$OUTPUT_DIR/train_$ASCEND_DEVICE_ID.log

if [ ! -f "$EXP" ]; then
    echo "error: experiment file '$EXP' not found (run from the repo, or set EXP=<path to exp .py>)" >&2
    exit 1
fi

ACCELERATOR=${ACCELERATOR:-}
case "$ACCELERATOR" in
    ''|auto|cpu|gpu|cuda|npu) ;;
    *) echo "error: unknown ACCELERATOR '$ACCELERATOR'; use one of auto, cpu, gpu, cuda, npu (or leave it unset)" >&2
       exit 1 ;;
esac

if [ "${etp_running_flag:-}" != "true" ]; then
    # shellcheck source=env_npu.sh source-path=SCRIPTDIR
    source "$test_path_dir/env_npu.sh"
fi
# With torch_npu installed but no CANN, torch's automatic backend import makes `import torch` fail; the code
# imports torch_npu itself (bevdepth/engine/devices.py), so automatic loading is not needed.
export TORCH_DEVICE_BACKEND_AUTOLOAD=${TORCH_DEVICE_BACKEND_AUTOLOAD:-0}

experiment_name() {  # EXP_NAME of the experiment file $1 (imported, not run), empty when it has none
    PYTHONPATH="$cur_path${PYTHONPATH:+:$PYTHONPATH}" python3 -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("launch_experiment", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(getattr(module, "EXP_NAME", ""))' "$1" | tail -n 1
}
# Same run folder as the CLI's default ./outputs/<EXP_NAME> (the experiment's EXP_NAME, else the file name).
if [ -z "${RUN_DIR:-}" ]; then
    exp_name=$(experiment_name "$EXP")
    RUN_DIR=./outputs/${exp_name:-$(basename "$EXP" .py)}
fi

# Which device ACCELERATOR (unset: npu when torch_npu works, else auto) ends up on; cpu needs no probe.
if [ "$ACCELERATOR" = "cpu" ]; then
    device_kind=cpu
elif ! device_probe=$(python3 -m bevdepth.engine.devices "$ACCELERATOR"); then
    echo "error: accelerator '${ACCELERATOR:-auto}' is not usable here (see the message above)" >&2
    exit 1
else
    read -r ACCELERATOR device_kind <<< "$device_probe"
fi
if [ "$device_kind" = "cpu" ]; then
    PRECISION=${PRECISION:-32}
else
    PRECISION=${PRECISION:-16}
fi

# Fresh log folder for this run, made only once the checks above passed. Unlike the seed, ./outputs is NOT
# deleted: earlier runs are kept and this run gets a new version_N folder.
rm -rf "$OUTPUT_DIR"
mkdir -p "$OUTPUT_DIR/ckpt"

data_args=()
[ -n "$DATA_ROOT" ] && data_args+=(--data_root "$DATA_ROOT")
[ -n "$VERSION" ] && data_args+=(--version "$VERSION")
read -r -a extra_args <<< "$EXTRA_ARGS"
# The seed's patched Lightning launcher always pinned the DDP ranks to blocks of cores (taskset); keep that on
# NPU hosts, where the published figures were measured.
if [ "$device_kind" = "npu" ]; then
    BIND_CPU_CORES=${BIND_CPU_CORES:-1}
fi
bind_args=()
[ "${BIND_CPU_CORES:-0}" = "1" ] && bind_args=(--bind_cpu_cores)

run_training() {  # trains into $train_log; sets e2e_time (seconds), exits on failure
    echo "training $EXP on $RANK_SIZE x $device_kind (accelerator $ACCELERATOR, precision $PRECISION), batch $batch_size per device, log $train_log"
    local start_time end_time train_status
    start_time=$(date +%s)
    python3 "$EXP" \
        --seed 0 \
        --learning_rate "$learning_rate" \
        --max_epoch "$train_epochs" \
        --amp_backend native \
        --accelerator "$ACCELERATOR" \
        --devices "$RANK_SIZE" \
        --precision "$PRECISION" \
        --batch_size_per_device "$batch_size" \
        --default_root_dir "$RUN_DIR" \
        "${bind_args[@]}" "${data_args[@]}" "${extra_args[@]}" > "$train_log" 2>&1
    train_status=$?
    end_time=$(date +%s)
    e2e_time=$((end_time - start_time))
    if [ "$train_status" -ne 0 ]; then
        tail -n 20 "$train_log" >&2
        echo "error: training failed with exit code $train_status; full log: $train_log" >&2
        exit "$train_status"
    fi
}

report_performance() {  # prints the FPS and E2E lines; sets step_time (seconds) and FPS, exits without step_time
    echo "------------------ Final result ------------------"
    # Mean of the last 50 `step_time=  <seconds>` lines (all ranks write into the same log, as in the seed).
    step_time=$(grep -oE 'step_time=[[:space:]]*[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?' "$train_log" \
        | sed -E 's/step_time=[[:space:]]*//' | tail -n 50 | awk '{sum += $1} END {if (NR > 0) printf "%.9f\n", sum / NR}')
    if [ -z "$step_time" ] || awk -v t="$step_time" 'BEGIN {exit !(t <= 0)}'; then
        echo "error: no step_time= lines in $train_log, cannot compute FPS" >&2
        exit 1
    fi
    # Samples per second over all devices. 4 decimals as the seed README's figures (39.1468); the seed's script
    # truncated to an integer, which reads 0 for runs slower than one sample per second (CPU).
    FPS=$(awk -v bs="$batch_size" -v n="$RANK_SIZE" -v t="$step_time" 'BEGIN {printf "%.4f\n", bs * n / t}')
    echo "Final Performance images/sec : $FPS"
    echo "E2E Training Duration sec : $e2e_time"
}

write_case_log() {  # $1: case suffix (acc / perf); further arguments: extra lines (the metrics)
    local suffix=$1
    shift
    BatchSize=$batch_size
    DeviceType=$(uname -m)
    CaseName=${Network}_bs${BatchSize}_${RANK_SIZE}p_${suffix}
    ActualFPS=$FPS
    # Milliseconds per step (the seed computed it as bs * RANK_SIZE * 1000 / FPS, from the truncated FPS).
    TrainingTime=$(awk -v t="$step_time" 'BEGIN {printf "%.2f\n", t * 1000}')
    case_log=$OUTPUT_DIR/$CaseName.log
    {
        echo "Network = ${Network}"
        echo "RankSize = ${RANK_SIZE}"
        echo "BatchSize = ${BatchSize}"
        echo "DeviceType = ${DeviceType}"
        echo "CaseName = ${CaseName}"
        echo "ActualFPS = ${ActualFPS}"
        echo "TrainingTime = ${TrainingTime}"
        echo "E2ETrainingTime = ${e2e_time}"
        if [ "$#" -gt 0 ]; then
            printf '%s\n' "$@"
        fi
    } > "$case_log"
}
