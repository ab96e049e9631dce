# shellcheck shell=bash
# Ascend NPU environment for the launch scripts (the Ascend port's test/env_npu.sh). Source it, do not run it:
#   source test/env_npu.sh
# It finds the CANN toolkit (Install_Path in /etc/Ascend/ascend_cann_install.info, else /usr/local/Ascend;
# ascend-toolkit if present, else nnae) and sources its set_env.sh. Where there is no CANN set_env.sh (CPU or
# GPU hosts) it prints a note and changes nothing, so sourcing it is always safe.
# For installs elsewhere: ASCEND_CANN_INSTALL_INFO=<info file> and/or ASCEND_INSTALL_ROOT=<folder with
# ascend-toolkit/ or nnae/> override the two defaults (Install_Path in the info file still wins).

_cann_install_info=${ASCEND_CANN_INSTALL_INFO:-/etc/Ascend/ascend_cann_install.info}
_cann_root=${ASCEND_INSTALL_ROOT:-/usr/local/Ascend}
if [ -f "$_cann_install_info" ]; then
    _cann_path_line=$(grep -m1 '^Install_Path=' "$_cann_install_info" 2>/dev/null)
    if [ -n "$_cann_path_line" ]; then
        _cann_root=${_cann_path_line#Install_Path=}
    fi
fi
if [ -d "$_cann_root/ascend-toolkit/latest" ]; then
    _cann_set_env=$_cann_root/ascend-toolkit/set_env.sh
else
    _cann_set_env=$_cann_root/nnae/set_env.sh
fi

if [ ! -f "$_cann_set_env" ]; then
    echo "note: Ascend CANN set_env.sh not found ($_cann_set_env); NPU environment not set (expected on CPU/GPU hosts)"
else
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/include/hdf5/lib/
    # shellcheck disable=SC1090
    source "$_cann_set_env"

    if command -v msnpureport >/dev/null 2>&1; then
        # Device-side logs: level error on devices 0-7, event logs off.
        for _npu_id in 0 1 2 3 4 5 6 7; do
            msnpureport -g error -d "$_npu_id" >/dev/null 2>&1
        done
        msnpureport -e disable >/dev/null 2>&1
    fi

    export ASCEND_GLOBAL_LOG_LEVEL=3        # host logs: error only
    export ASCEND_GLOBAL_EVENT_ENABLE=0     # no event logs
    export ASCEND_SLOG_PRINT_TO_STDOUT=0    # logs to files, not stdout
    export TASK_QUEUE_ENABLE=1              # asynchronous task queue
    export BMMV2_ENABLE=1
    export COMBINED_ENABLE=1                # combine non-contiguous ops
    export PTCOPY_ENABLE=1
    export HCCL_WHITELIST_DISABLE=1         # no HCCL trust-list check
    export SCALAR_TO_HOST_MEM=1
    echo "Ascend NPU environment set from $_cann_set_env"
fi
unset _cann_install_info _cann_root _cann_path_line _cann_set_env _npu_id
