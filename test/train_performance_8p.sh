#!/bin/bash
# Throughput run of the ModelZoo launch scripts (the Ascend port's test/train_performance_8p.sh): trains 1 epoch on RANK_SIZE
# devices, then prints
#   Final Performance images/sec : <FPS>        FPS = batch_size * RANK_SIZE / mean(last 50 step_time), 4 decimals
#   E2E Training Duration sec : <seconds>
# and writes test/output/0/<CaseName>.log. Run from the repo root, from test/, or from anywhere:
#   bash test/train_performance_8p.sh
# Environment overrides (defaults = the seed's 8-device NPU run):
#   RANK_SIZE=8  EXP=<MatrixVT exp>  DATA_ROOT=<exp default>  VERSION=<exp default>  EPOCHS=1  BATCH_SIZE=8
#   LEARNING_RATE=0.000003125 (per image)  ACCELERATOR=npu if torch_npu works, else auto
#   PRECISION=16 on NPU/GPU, 32 on CPU  EXTRA_ARGS='<more CLI flags>'
#   OUTPUT_DIR=test/output/0 (logs)  RUN_DIR=outputs/<EXP_NAME of the exp> (--default_root_dir)
#   BIND_CPU_CORES=1 on NPU, else 0 (1 adds --bind_cpu_cores: each rank on its own block of CPU cores)
# Example on CPU with the tiny experiment:
#   RANK_SIZE=2 ACCELERATOR=cpu EXP=exps/nuscenes/tiny/matrixvt_tiny_synthetic.py DATA_ROOT=<dataroot> \
#     VERSION=v1.0-mini EPOCHS=1 BATCH_SIZE=1 EXTRA_ARGS='--limit_train_batches 4' bash test/train_performance_8p.sh

default_epochs=1
# shellcheck source=common_8p.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common_8p.sh"

run_training
report_performance
# The seed named this case "_acc" too (copy-paste); the ModelZoo convention for throughput runs is "_perf".
write_case_log perf
