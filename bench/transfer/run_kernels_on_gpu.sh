# Template kernels on one GPU (issue 13, item 3): v1 (previous) vs v2 settings vs b.copy_(a), back
# to back, at 32/64/128/512 MiB payloads, byte-exact against the planner; then the transfer GPU
# tests (NIXL cell included) and the kernel-settings GPU test. Writes under $OUT.
# Usage (repository root, on the GPU machine; carry .device-wheels):  OUT=dir sh bench/transfer/run_kernels_on_gpu.sh
# MIB, VARIANTS (comma-separated names from bench_transfer.VARIANTS), ROUNDS, BENCH_S, TEST_S
# (0: no tests). Without .device-wheels the NIXL test cell skips (the bench needs no NIXL).
set -x
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
[ -d .device-wheels ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD PYTHONUNBUFFERED=1
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp
timeout ${BENCH_S:-150} python3 bench/transfer/bench_transfer.py --skip-nixl \
  --variants-mib ${MIB:-32,64,128,512} --variants "${VARIANTS:-}" --rounds ${ROUNDS:-3} \
  --out $OUT/kernels.json 2>&1 | tee $OUT/bench.log
echo "bench done at $(( $(date +%s) - START )) s"
[ "${TEST_S:-100}" != 0 ] && timeout ${TEST_S:-100} python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs \
  tests/gpu/test_kvcopy_kernels_gpu.py tests/gpu/test_runtime_transfer_gpu.py 2>&1 \
  | grep -v "NIXL INFO" | tee $OUT/gpu_tests.log | tail -15
echo "total $(( $(date +%s) - START )) s"
