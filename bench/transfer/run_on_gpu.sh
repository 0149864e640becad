set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD/runtime
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp PYTHONUNBUFFERED=1
python3 -c "import nixl, torch; print(nixl.__file__, torch.__version__)"
timeout 240 python3 bench/transfer/bench_transfer.py --out $OUT/bench_transfer.json --sizes-mib 64,256,1024 --nixl-sizes-mib 64,512 --reps 5 2>&1 | grep -v "NIXL INFO" | tee $OUT/bench.log
timeout 200 python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_runtime_transfer_gpu.py -x 2>&1 | tail -30 | tee $OUT/gpu_tests.log
