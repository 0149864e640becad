# Issue 13 on one GPU, by stage (STAGES, default "tests upload streams gil"):
#   tests   the GPU tests, file by file (TESTS: which files; logs tests_<file>.log)
#   upload  bench/transfer/bench_upload.py (D's table upload, pinned against pageable)
#   streams bench_e2e P/D with the transfer kernels on the engine's stream (the previous path)
#           and on their own high-priority stream (PD_RUNTIME_TRANSFER_STREAM), D at TP 1 and 2
#           (STREAM_TPS), once per round (ROUNDS="a b ...": the paths alternate)
#   gil     bench_e2e P/D with the GIL switch interval at 5000 (Python's) and 500 us, per round
#   stage   bench_e2e P/D with P's gather at PREPARE (PD_RUNTIME_STAGE_AT_HOLD=0, the previous
#           path) and at hold(), P's staging room for 18 requests, per round
#   tiles   bench/transfer/bench_transfer.py --sweep-mib: the template kernel's tile and warps
#           at 64 and 128 MiB, every case, against a copy
#   hostpath bench/transfer/bench_host_path.py: the baseline commit's transfer engine (its
#           tarball in .device-wheels/) against this one, pulls alternating
#   launch  bench/transfer/bench_launch.py: a template kernel's launch through Triton's JIT
#           against the direct launch of its compiled kernel (host time of the call), without
#           and with a NIXL agent in the process
#   kvlaunch bench_e2e P/D with the template kernels launched through the JIT
#           (PD_RUNTIME_KV_LAUNCH=jit, the previous path) and directly, per round
#   repost  bench_e2e P/D with a NIXL handle built and released per READ
#           (PD_RUNTIME_NIXL_REPOST=off, the previous path) and finished handles posted
#           again, per round
#   mla     bench_e2e aggregated and P/D, the MLA geometry, 1k x 8
#   big     bench_e2e P/D, then aggregated: 8k x 32 and 32k x 8 (8k x 8 beside them)
# Repository root, on the GPU machine: OUT=dir [STAGES=...] [E2E_ARGS=...]
#   sh bench/e2e/run_stages.sh        (every result and log in $OUT/results.tgz)
# Wheels the machine lacks (nixl-cu13, msgspec; cp312) are expected in .device-wheels/.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD PYTHONUNBUFFERED=1
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp
R=/tmp/results; mkdir -p $R
STAGES=${STAGES:-tests upload streams gil}
E2E_ARGS=${E2E_ARGS:---prompts 1024,8192 --concurrency 1,8 --reps 2 --reps-concurrent 2}
e2e() {  # name, extra args...
  n=$1; shift
  timeout ${E2E_S:-150} python3 bench/e2e/bench_e2e.py --modes pd --prefill-lengths "" \
    --decode-cases "" $E2E_ARGS --out $R/e2e_$n.json "$@" 2>&1 | grep -v "NIXL INFO" > $R/e2e_$n.log
  echo "== e2e $n"; tail -6 $R/e2e_$n.log
}
case " $STAGES " in *" tests "*)
  for f in ${TESTS:-tests/gpu/test_*.py tests/unit/engine/test_model_gpu.py}; do
    echo "== $f"; n=$(basename $f .py)
    timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider --noconftest -rfEs \
      --tb=short $f 2>&1 | grep -v "NIXL INFO" > $R/tests_$n.log; tail -4 $R/tests_$n.log
  done 2>&1 | tee $R/gpu_tests.txt ;; esac
case " $STAGES " in *" upload "*)
  timeout 120 python3 bench/transfer/bench_upload.py --out $R/upload.json 2>&1 | tail -12
  timeout 60 python3 bench/transfer/bench_upload.py --peers 2 --reps 100 --blocks 64,512 \
    --out $R/upload_2peers.json 2>&1 | tail -8 ;; esac
case " $STAGES " in *" streams "*)
  for round in ${ROUNDS:-a}; do for tp in ${STREAM_TPS:-1 2}; do
    PD_RUNTIME_TRANSFER_STREAM=engine e2e tp${tp}_engine_$round --d-tp $tp
    PD_RUNTIME_TRANSFER_STREAM=priority e2e tp${tp}_priority_$round --d-tp $tp
  done; done ;; esac
case " $STAGES " in *" gil "*)
  for round in ${ROUNDS:-a}; do
    e2e gil5000_$round --gil-switch-interval-us 5000
    e2e gil500_$round --gil-switch-interval-us 500
  done ;; esac
case " $STAGES " in *" stage "*)
  for round in ${ROUNDS:-a}; do for tp in ${STAGE_TPS:-1}; do
    PD_RUNTIME_STAGE_AT_HOLD=0 e2e tp${tp}_stage0_$round --d-tp $tp --p-staging-requests 18
    PD_RUNTIME_STAGE_AT_HOLD=1 e2e tp${tp}_stage1_$round --d-tp $tp --p-staging-requests 18
  done; done ;; esac
case " $STAGES " in *" hostpath "*)
  timeout ${HOSTPATH_S:-120} python3 bench/transfer/bench_host_path.py --device cuda \
    --out $R/host_path.json ${HOSTPATH_ARGS:---reps 40} 2>&1 | grep -v "NIXL INFO" \
    > $R/host_path.log; tail -8 $R/host_path.log ;; esac
case " $STAGES " in *" tiles "*)
  timeout ${TILES_S:-150} python3 bench/transfer/bench_transfer.py --skip-nixl --sizes-mib 64 \
    --sweep-mib ${TILES_MIB:-64,128} ${TILES_ARGS:-} --out $R/tiles.json 2>&1 | grep -E "back-to-back|sweep" \
    > $R/tiles.log; tail -3 $R/tiles.log ;; esac
case " $STAGES " in *" launch "*)
  timeout ${LAUNCH_S:-150} python3 bench/transfer/bench_launch.py ${LAUNCH_ARGS:---nixl} \
    --out $R/launch.json 2>&1 | grep -v "NIXL INFO" | tail -24 ;; esac
case " $STAGES " in *" kvlaunch "*)
  for round in ${ROUNDS:-a}; do
    PD_RUNTIME_KV_LAUNCH=jit e2e kvlaunch_jit_$round
    PD_RUNTIME_KV_LAUNCH=direct e2e kvlaunch_direct_$round
  done ;; esac
case " $STAGES " in *" repost "*)
  for round in ${ROUNDS:-a}; do
    PD_RUNTIME_NIXL_REPOST=off e2e repost_off_$round
    PD_RUNTIME_NIXL_REPOST=on e2e repost_on_$round
  done ;; esac
case " $STAGES " in *" mla "*)
  E2E_ARGS="--prompts 1024 --concurrency 1,8 --reps 2 --reps-concurrent 2" \
    e2e mla --geometry dsv2-lite-mla --modes aggregated,pd ;; esac
case " $STAGES " in *" big "*)
  BIG="--prompts 8192,32768 --concurrency 8,32 --max-cell-tokens 300000 --reps-concurrent 1"
  E2E_ARGS="$BIG" E2E_S=${BIG_PD_S:-200} e2e big_pd
  E2E_ARGS="$BIG" E2E_S=${BIG_AGG_S:-240} e2e big_agg --modes aggregated ;; esac
tar czf $OUT/results.tgz -C $R .
