# Issue 13 decode paths on one GPU: the GPU tests, decode_modes.py (old / legacy / paged / graph
# per step, same positions), then optionally bench_e2e.py twice, old path (PD_RUNTIME_DECODE=legacy
# PD_RUNTIME_KEY_BUCKET=0) and new (defaults), same cells. Repository root, on the GPU machine:
#   OUT=dir [STAGES="tests modes e2e"] [E2E_ARGS="..."] sh bench/e2e/run_decode_paths.sh
# Wheels the machine lacks (nixl-cu13, msgspec; cp312) are expected in .device-wheels/.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD PYTHONUNBUFFERED=1
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp
STAGES=${STAGES:-tests modes}
case " $STAGES " in *" tests "*)
  timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs \
    ${TESTS:-tests/gpu tests/unit/engine/test_model_gpu.py} 2>&1 \
    | grep -v "NIXL INFO" > $OUT/gpu_tests.log; tail -25 $OUT/gpu_tests.log ;; esac
case " $STAGES " in *" modes "*)
  timeout ${MODES_S:-240} python3 bench/e2e/decode_modes.py --nixl --out $OUT/decode_modes.json \
    $MODES_ARGS 2>&1 | grep -v "NIXL INFO" | tail -30 ;; esac
case " $STAGES " in *" e2e "*)
  for p in old new; do
    if [ $p = old ]; then export PD_RUNTIME_DECODE=legacy PD_RUNTIME_KEY_BUCKET=0
    else unset PD_RUNTIME_DECODE PD_RUNTIME_KEY_BUCKET; fi
    timeout ${E2E_S:-200} python3 bench/e2e/bench_e2e.py --out $OUT/e2e_$p.json $E2E_ARGS 2>&1 \
      | grep -v "NIXL INFO" > $OUT/e2e_$p.log; tail -22 $OUT/e2e_$p.log
  done ;; esac
