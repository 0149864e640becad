python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD/runtime
export PYTHONUNBUFFERED=1
for tw in "16384 4" "32768 8" "65536 8" "32768 16" "65536 16"; do set -- $tw; echo "== tile $1 warps $2"; PD_RUNTIME_TILE_BYTES=$1 PD_RUNTIME_NUM_WARPS=$2 python3 bench/transfer/bench_transfer.py --skip-nixl --sizes-mib 64,1024 --out $OUT/sweep_$1_$2.json 2>&1 | grep "of copy"; done
