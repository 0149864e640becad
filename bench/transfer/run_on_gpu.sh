# Runtime transfer on one GPU: GPU tests, template-kernel sweep, kernels (old vs ours vs copy),
# NIXL two-process pulls (ours vs per-block baseline) with a READ study. Writes under $OUT.
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD/runtime
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp PYTHONUNBUFFERED=1
python3 -c "import nixl, torch, triton; print(nixl.__file__, torch.__version__, triton.__version__)"
timeout ${GPU_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_runtime_transfer_gpu.py 2>&1 | grep -v "NIXL INFO" | tail -25 | tee $OUT/gpu_tests.log
timeout ${BENCH_S:-330} python3 bench/transfer/bench_transfer.py --out $OUT/bench_transfer.json ${BENCH_ARGS:---sweep-mib 64,512 --sizes-mib 64,128,1024 --nixl-sizes-mib 64,512 --reps 5} 2>&1 | grep -v "NIXL INFO" | tee $OUT/bench.log
