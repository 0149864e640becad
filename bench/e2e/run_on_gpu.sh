# bench/e2e on one GPU: the GPU tests (tests/gpu), the SDPA probe, then bench_e2e.py.
# Usage (repository root, on the GPU machine): OUT=dir [STAGES="tests probe bench"]
#   [BENCH_ARGS="..."] [TEST_S=300] [BENCH_S=420] sh bench/e2e/run_on_gpu.sh
# Wheels the machine lacks (nixl-cu13, msgspec; cp312) are expected in .device-wheels/.
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD PYTHONUNBUFFERED=1
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp
python3 -c "import nixl_cu13, torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
STAGES=${STAGES:-tests probe bench}
case " $STAGES " in *" tests "*)
  # tests/gpu, and the engine's own CUDA tests where they exist (tests/unit/engine/*gpu*.py)
  timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs tests/gpu \
    $(ls tests/unit/engine/*gpu*.py 2>/dev/null) 2>&1 \
    | grep -v "NIXL INFO" | tee $OUT/gpu_tests.log | tail -40 ;; esac
case " $STAGES " in *" probe "*)
  timeout 120 python3 bench/e2e/sdpa_probe.py --out $OUT/sdpa_probe.json 2>&1 | tail -8 ;; esac
case " $STAGES " in *" bench "*)
  timeout ${BENCH_S:-420} python3 bench/e2e/bench_e2e.py --out $OUT/e2e.json $BENCH_ARGS 2>&1 \
    | grep -v "NIXL INFO" | tee $OUT/bench.log | tail -60 ;; esac
