# Issue 13 item 2 on one GPU: prefill_bench.py (one process, turns alternating: the engine with
# its elementwise glue fused (kernels.fused), the same engine with the torch ops
# (model.fused = False, as PD_RUNTIME_FUSED=0), transformers on the same weights), then the GPU
# tests the fused path touches. Repository root, on the GPU machine:
#   OUT=dir [STAGES="bench tests"] [BENCH_ARGS="..."] [BENCH_S=170] [TEST_S=190] \
#     sh bench/e2e/run_prefill_fused.sh
# The msgspec cp312 wheel is expected in .device-wheels/ (no NIXL needed).
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .device-wheels/msgspec-*.whl
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
STAGES=${STAGES:-bench tests}
case " $STAGES " in *" bench "*)
  timeout ${BENCH_S:-170} python3 bench/e2e/prefill_bench.py --lengths 1024,8192,32768 --reps 5 \
    --profile-len 8192 --top 25 --out $OUT/prefill.json $BENCH_ARGS 2>&1 \
    | grep -v "USDT\|profiler_st" | tee $OUT/prefill.log ;; esac
case " $STAGES " in *" tests "*)
  timeout ${TEST_S:-190} python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs \
    ${TESTS:-tests/gpu/test_fused_gpu.py tests/gpu/test_decode_paths_gpu.py \
    tests/unit/engine/test_model_gpu.py} > $OUT/gpu_tests.log 2>&1; tail -25 $OUT/gpu_tests.log ;; esac
