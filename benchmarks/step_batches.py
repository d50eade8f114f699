"""One streaming `step` from Python at several layer sizes and batch sizes: a layer (its weights
read in place), its frozen() copy (weights packed once for the fused step kernels) and
PyTorch's cell (LSTMCell, GRUCell, RNNCell) where torch is installed; microseconds per call,
the best of five runs after a warm-up.

    python benchmarks/step_batches.py                       # every thread, the default sizes
    python benchmarks/step_batches.py --threads 1 --sizes 32,64 --batches 1,2,4
"""
import argparse
import time

import numpy as np

import rnncore


def best_us(fn, n):
    for _ in range(max(1, n // 20)):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n)
    return min(runs) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="threads (0: rnncore's default)")
    ap.add_argument("--sizes", default="32,64;128,256;256,512", help="I,H pairs separated by ;")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--cells", default="LSTM,GRU,RNN")
    a = ap.parse_args()
    if a.threads:
        rnncore.set_num_threads(a.threads)
    try:
        import torch
        torch.set_num_threads(rnncore.get_num_threads())
    except ImportError:
        torch = None
    print(f"threads {rnncore.get_num_threads()}, isa {rnncore.info()['isa']}")
    print("| cell | I, H | batch | layer us | frozen us | PyTorch cell us | layer / cell | frozen / cell |")
    print("|---|---|---|---|---|---|---|---|")
    for pair in a.sizes.split(";"):
        I, H = map(int, pair.split(","))
        for B in map(int, a.batches.split(",")):
            for cell in a.cells.split(","):
                layer = getattr(rnncore, cell)(I, H, seed=0)
                layer.eval()
                frozen = layer.frozen()
                x = np.random.default_rng(0).standard_normal((B, I)).astype(np.float32)
                st, fst = layer.initial_state(B), frozen.initial_state(B)
                n = max(200, int(2e7 / (B * (I + H) * H * (4 if cell == "LSTM" else 3 if cell == "GRU" else 1))))
                n = min(n, 20000)
                lt = best_us(lambda: layer.step(x, st), n)
                ft = best_us(lambda: frozen.step(x, fst), n)
                tt = float("nan")
                if torch is not None:
                    c = getattr(torch.nn, cell + "Cell")(I, H)
                    xt = torch.from_numpy(x)
                    hx = (torch.zeros(B, H), torch.zeros(B, H)) if cell == "LSTM" else torch.zeros(B, H)
                    with torch.no_grad():
                        tt = best_us(lambda: c(xt, hx), n)
                print(f"| {cell} | {I}, {H} | {B} | {lt:.2f} | {ft:.2f} | {tt:.2f} | {lt / tt:.3f} | {ft / tt:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
