# The transfer's host path on one GPU (about 2 minutes): the transfer GPU tests (byte-exact,
# Triton template kernels, a NIXL VRAM -> VRAM test cell), the host-path bench (baseline commit
# and current path side by side, Llama-3-8B geometry, 64 / 512 / 2048 blocks), then the P/D
# engine test on CUDA (D's pull thread beside CUDA graphs) with whatever time is left.
# Usage (repository root, on the GPU machine; carry .device-wheels):  OUT=dir sh bench/transfer/run_host_path_on_gpu.sh
# .device-wheels/ holds the cp312 wheels the machine lacks (nixl-cu13, msgspec) and the baseline
# source (pd_runtime_host_path_baseline.tar.gz, made here by
# `python bench/transfer/bench_host_path.py --pack-baseline <commit>`).
set -x
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD PYTHONUNBUFFERED=1
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp
python3 -c "import nixl_cu13, torch, triton; print(torch.__version__, triton.__version__)"
timeout ${TEST_S:-60} python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs \
  tests/gpu/test_runtime_transfer_gpu.py 2>&1 | grep -v "NIXL INFO" | tee $OUT/gpu_tests.log | tail -15
timeout ${BENCH_S:-60} python3 bench/transfer/bench_host_path.py --device cuda \
  --out $OUT/host_path.json ${BENCH_ARGS:---reps 40} 2>&1 | grep -v "NIXL INFO" | tee $OUT/host_path.log | tail -25
LEFT=$((135 - $(date +%s) + START))
if [ $LEFT -gt 30 ]; then
  timeout $LEFT python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs \
    tests/gpu/test_engine_gpu.py -k pd_two_processes 2>&1 | grep -v "NIXL INFO" \
    | tee $OUT/engine_pd_test.log | tail -8
fi
echo "total $(( $(date +%s) - START )) s"
