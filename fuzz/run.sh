#!/usr/bin/env bash
# Fuzzes the C++ model reader with libFuzzer (+ AddressSanitizer, UBSan) for a bounded time.
#   bash fuzz/run.sh [SECONDS]        (default 60; needs clang and libclang-rt, e.g.
#                                      apt-get install clang libclang-rt-14-dev)
# Seeds: models saved by the installed rnncore (python3 -c ...), so mutations start from
# valid files. Exit status non-zero when the fuzzer finds a crash (saved as crash-*).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET="${1:-60}"
CXX="${CXX:-$(command -v clang++ || command -v clang++-14 || true)}"
[ -n "$CXX" ] || { echo "fuzz: clang++ not found (apt-get install clang libclang-rt-14-dev)"; exit 2; }
OUT="${FUZZ_DIR:-build/fuzz}"
mkdir -p "$OUT/corpus"
python3 - "$OUT/corpus" <<'PY'
import sys, rnncore as rc
d = sys.argv[1]
rc.Sequential(rc.Embedding(7, 4, seed=0), rc.LSTM(4, 6, seed=1, batch_first=True), rc.Dense(6, 7)).save(f"{d}/lm.rnnc")
rc.Sequential(rc.OneHot(3), rc.GRU(3, 4, batch_first=True), rc.LastStep(), rc.Dense(4, 2)).save(f"{d}/clf.rnnc")
rc.RNN(2, 3, num_layers=2, bidirectional=True).save(f"{d}/rnn.rnnc")
PY
SRC=(cpp/src/model.cpp cpp/src/c_api.cpp cpp/src/layer.cpp cpp/src/dispatch.cpp cpp/src/runtime.cpp
     cpp/src/hopfield.cpp cpp/src/second_order.cpp cpp/src/cpu/kernels_generic.cpp)
FLAGS=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -Icpp/include -Icpp/src -DRNNCORE_VERSION=\"fuzz\"
       -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION)   # checksums off, so mutations reach the parser
"$CXX" "${FLAGS[@]}" "${SRC[@]}" fuzz/fuzz_loader.cpp -o "$OUT/fuzz_loader"
"$OUT/fuzz_loader" -max_total_time="$SECONDS_BUDGET" -max_len=65536 -rss_limit_mb=2048 \
  -artifact_prefix="$OUT/" "$OUT/corpus"
echo "fuzz: no crash in ${SECONDS_BUDGET} s"
