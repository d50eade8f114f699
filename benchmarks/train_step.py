"""Median time of one training step (forward + backward) of one rnncore layer, in a loop:
the harness behind the before/after figures of benchmarks/RESULTS.md (run the old and the new
build alternately; the machine is noisy).

    python benchmarks/train_step.py LSTM 16 100 256 128 [seconds]     # CELL B T H I
    python benchmarks/train_step.py GRU 64 100 512 256 --phases        # where the time goes

With --phases the script re-runs itself with RNNCORE_PHASES=1 and prints, per phase of the
kernels, the milliseconds of one step (thread 0 of the recurrence team, and the slowest
thread) and, for the matrix products, their GFLOP/s in the slowest thread's time against the
machine's sgemm peak (the roofline of a batched step) and, for the per-step products, the rate at which the team reads
W_hh (the roofline at batch 1: the L2's or the L3's read bandwidth). The timers cost a few
percent at batch 1.
"""
import os
import subprocess
import sys
import time
import types

import numpy as np

import rnncore
from rnncore.bench import GATES, sgemm_peak


def phase_flops(cell, B, T, H, I):
    """FLOPs of the phases that are matrix products (the rest are elementwise)."""
    G = GATES[cell]
    return {"forward.projection": 2.0 * T * B * G * H * I,
            "forward.product": 2.0 * (T - 1) * B * G * H * H,    # the first step's state is zero
            "backward.product": 2.0 * T * B * G * H * H,
            "backward.weight_grads": 2.0 * T * B * G * H * (I + H),
            "backward.input_grads": 2.0 * T * B * G * H * I}


def print_phases(cell, B, T, H, I, steps, times):
    # rnncore's own GEMM only (no peer library passed)
    peak = sgemm_peak(types.SimpleNamespace(torch=None), rnncore.get_num_threads())["rnncore"]
    fl = phase_flops(cell, B, T, H, I)
    print(f"phases of one step (ms; rnncore sgemm {peak:.0f} GFLOP/s on {rnncore.get_num_threads()} threads):")
    print(f"  {'phase':24s} {'thread 0':>9s} {'slowest':>9s}  GFLOP/s (% of sgemm), W_hh read")
    total = 0.0
    for name, per_thread in times.items():
        if not per_thread or max(per_thread) == 0:
            continue
        t0, tmax = per_thread[0] / steps * 1e3, max(per_thread) / steps * 1e3
        total += t0
        line = f"  {name:24s} {t0:9.2f} {tmax:9.2f}"
        if name in fl and tmax > 0:
            # the team's FLOPs in the slowest thread's time (the pipelined backward runs the
            # weight and input gradients mostly on thread 1, beside the recurrence on thread 0)
            gf = fl[name] / (tmax / 1e3) / 1e9
            line += f"  {gf:7.0f} ({100 * gf / peak:.0f}%)"
            if name.endswith(".product"):       # W_hh read once a step by the team
                line += f"  W_hh {fl[name] / (2 * B) * 4 / (tmax / 1e3) / 1e9:.0f} GB/s"
        print(line)
    print(f"  {'sum (thread 0)':24s} {total:9.2f}")


def main(argv):
    phases = "--phases" in argv
    argv = [a for a in argv if a != "--phases"]
    if len(argv) < 5:
        sys.exit(__doc__)
    if phases and not rnncore._core.phase_timing():
        env = dict(os.environ, RNNCORE_PHASES="1")
        sys.exit(subprocess.call([sys.executable, __file__, *argv, "--phases"], env=env))
    cell, B, T, H, I = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    secs = float(argv[5]) if len(argv) > 5 else 3.0
    layer = {"LSTM": rnncore.LSTM, "GRU": rnncore.GRU, "RNN": rnncore.RNN}[cell](I, H)
    layer.train()
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    dy = np.ones((T, B, H), np.float32)
    layer.forward(x)
    layer.backward(dy)
    if phases:
        rnncore._core.phase_times(True)
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
    if phases:
        print_phases(cell, B, T, H, I, len(total), rnncore._core.phase_times(True))


if __name__ == "__main__":
    main(sys.argv[1:])
