#!/usr/bin/env bash
# Per-step C++ benchmark at batch 1: saves LSTM/GRU layers from Python, builds step_bench
# against the installed package (find_package(rnncore)) and runs it, with the Eigen
# (RTNeural-style) baseline when Eigen 3 is installed (apt install libeigen3-dev).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${BENCH_DIR:-build/step-bench}"
mkdir -p "$OUT"
python3 - "$OUT" <<'PY'
import sys, rnncore as rc
d = sys.argv[1]
for cls, I, H in ((rc.LSTM, 32, 64), (rc.GRU, 32, 64), (rc.LSTM, 128, 256), (rc.GRU, 128, 256),
                 (rc.LSTM, 512, 512), (rc.GRU, 512, 512)):
    cls(I, H, seed=0).save(f"{d}/{cls.__name__.lower()}_I{I}_H{H}.rnnc")
PY
# -DEIGEN_REF_NATIVE=ON: the Eigen baseline with RTNeural's recommended -march=native, run
# here on the machine that built it (the quoted figures)
cmake -S benchmarks/cpp -B "$OUT/build" -Drnncore_DIR="$(python3 -m rnncore --cmake-dir)" \
  -DEIGEN_REF_NATIVE=ON > /dev/null
cmake --build "$OUT/build" > /dev/null
"$OUT/build/step_bench" "$OUT/lstm_I32_H64.rnnc:lstm:32:64:1.1" "$OUT/gru_I32_H64.rnnc:gru:32:64:0.8" \
  "$OUT/lstm_I128_H256.rnnc:lstm:128:256:19" "$OUT/gru_I128_H256.rnnc:gru:128:256:13" \
  "$OUT/lstm_I512_H512.rnnc:lstm:512:512:0" "$OUT/gru_I512_H512.rnnc:gru:512:512:0"
