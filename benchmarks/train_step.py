"""Median time of one training step (forward + backward) of one rnncore layer, in a loop:
the harness behind the before/after figures of benchmarks/RESULTS.md (run the old and the new
build alternately; the machine is noisy).

    python benchmarks/train_step.py LSTM 16 100 256 128 [seconds]     # CELL B T H I
"""
import sys
import time

import numpy as np

import rnncore


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    cell, B, T, H, I = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    secs = float(argv[5]) if len(argv) > 5 else 3.0
    layer = {"LSTM": rnncore.LSTM, "GRU": rnncore.GRU, "RNN": rnncore.RNN}[cell](I, H)
    layer.train()
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    dy = np.ones((T, B, H), np.float32)
    layer.forward(x)
    layer.backward(dy)
    total, fwd = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs:
        t = time.perf_counter()
        layer.forward(x)
        t1 = time.perf_counter()
        layer.backward(dy)
        total.append(time.perf_counter() - t)
        fwd.append(t1 - t)
    print(f"train {cell} T={T} B={B} H={H} I={I}: median {np.median(total) * 1e3:.2f} ms "
          f"(forward {np.median(fwd) * 1e3:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
