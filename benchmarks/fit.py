"""The main job end to end: one epoch of `rnncore train`'s model (a character-level LSTM:
Embedding -> LSTM -> Dense, Adam, gradient clipping, truncated BPTT) with `Sequential.fit`,
against the same loop written in PyTorch (nn.Embedding, nn.LSTM, nn.Linear, torch.optim.Adam,
clip_grad_norm_, cross_entropy), same weights, same batches, same threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fit.py [--chars 200000]
        [--cell LSTM|GRU|RNN] [--hidden 256] [--embed 64] [--layers 1] [--batch-size 32]
        [--seq-len 128] [--bptt 64] [--threads 2] [--rounds 3]

Each round times one epoch of each library in turn (the machine is noisy: compare within a
run); it prints the median seconds per epoch, characters per second, the ratio (rnncore /
PyTorch) and each library's mean training loss over its epochs as a check that both learn.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

import rnncore as rc
from rnncore.data import CharVocab, ascii_clean, default_corpus, windows


def rnncore_model(V, args):
    return rc.Sequential(
        rc.Embedding(V, args.embed, seed=0),
        getattr(rc, args.cell)(args.embed, args.hidden, num_layers=args.layers, batch_first=True, seed=0),
        rc.Dense(args.hidden, V, seed=0))


def torch_model(torch, m, V, args):
    """The same model with rnncore's initial weights."""
    class CharLSTM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(V, args.embed)
            self.lstm = getattr(torch.nn, args.cell)(args.embed, args.hidden, num_layers=args.layers,
                                                     batch_first=True)
            self.out = torch.nn.Linear(args.hidden, V)

        def forward(self, x, state=None):
            y, state = self.lstm(self.emb(x), state)
            return self.out(y), state

    t = CharLSTM()
    emb, lstm, dense = m.blocks
    with torch.no_grad():
        t.emb.weight.copy_(torch.from_numpy(emb.params["weight"]))
        t.lstm.load_state_dict({k: torch.from_numpy(v) for k, v in lstm.state_dict().items()})
        t.out.weight.copy_(torch.from_numpy(dense.params["weight"]))
        t.out.bias.copy_(torch.from_numpy(dense.params["bias"]))
    return t


def torch_epoch(torch, t, opt, X, Y, order, args):
    """One epoch of the loop fit() runs: per batch, chunks of bptt steps, the state carried
    without its gradient, a clipped Adam step after each chunk."""
    t.train()
    tot = cnt = 0.0
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    for b0 in range(0, len(order), args.batch_size):
        idx = torch.from_numpy(order[b0:b0 + args.batch_size])
        xb, yb = Xt[idx], Yt[idx]
        state = None
        for s in range(0, xb.shape[1], args.bptt):
            out, state = t(xb[:, s:s + args.bptt], state)
            state = tuple(v.detach() for v in state) if isinstance(state, tuple) else state.detach()
            yc = yb[:, s:s + args.bptt]
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yc.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(t.parameters(), 5.0)
            opt.step()
            tot += float(loss.detach()) * yc.numel()
            cnt += yc.numel()
    return tot / cnt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--cell", default="LSTM", choices=["LSTM", "GRU", "RNN"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bptt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    rc.set_num_threads(threads)
    import torch
    torch.set_num_threads(threads)

    text = ascii_clean(default_corpus(args.chars))
    vocab = CharVocab.from_text(text)
    X, Y = windows(vocab.encode(text), args.seq_len)
    X, Y = X.astype(np.int64), Y.astype(np.int64)
    V = len(vocab)
    m = rnncore_model(V, args)
    t = torch_model(torch, m, V, args)
    ropt = rc.optim.Adam(lr=3e-3)
    topt = torch.optim.Adam(t.parameters(), lr=3e-3)
    print(f"rnncore {rc.__version__} ({rc.info()['isa']}), torch {torch.__version__}, {threads} threads: "
          f"char {args.cell} (embed {args.embed}, hidden {args.hidden}, layers {args.layers}, vocabulary {V}), "
          f"{len(X)} sequences of {args.seq_len}, batch {args.batch_size}, truncated BPTT every "
          f"{args.bptt} steps; Adam, clip 5", flush=True)
    times = {"rnncore": [], "torch": []}
    losses = {"rnncore": [], "torch": []}
    for r in range(args.rounds):
        order = np.random.default_rng(r).permutation(len(X))
        t0 = time.perf_counter()
        h = m.fit(X[order], Y[order], optimizer=ropt, epochs=1, batch_size=args.batch_size,
                  bptt=args.bptt, clip_norm=5.0, progress=False, shuffle=False)
        times["rnncore"].append(time.perf_counter() - t0)
        losses["rnncore"].append(h.history["loss"][-1])
        t0 = time.perf_counter()
        losses["torch"].append(torch_epoch(torch, t, topt, X, Y, order, args))
        times["torch"].append(time.perf_counter() - t0)
        print(f"round {r + 1}: rnncore {times['rnncore'][-1]:.2f} s (loss {losses['rnncore'][-1]:.3f}), "
              f"torch {times['torch'][-1]:.2f} s (loss {losses['torch'][-1]:.3f})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    chars = len(X) * args.seq_len
    print(f"epoch (median of {args.rounds}): rnncore {med['rnncore']:.2f} s ({chars / med['rnncore']:,.0f} "
          f"chars/s), PyTorch {med['torch']:.2f} s ({chars / med['torch']:,.0f} chars/s), ratio "
          f"{med['rnncore'] / med['torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
