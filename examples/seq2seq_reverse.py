"""Encoder-decoder translation on a toy task: reverse a sequence of tokens.
Trains rnncore.Seq2Seq with teacher forcing, then decodes greedily and with beam search.
Run: python examples/seq2seq_reverse.py   (RNNCORE_EXAMPLE_QUICK=1 for a smoke run)
"""
import os

import numpy as np

import rnncore as rc

QUICK = os.environ.get("RNNCORE_EXAMPLE_QUICK") == "1"
PAD, BOS, EOS, V, L = 0, 1, 2, 12, 6
rng = np.random.default_rng(0)
n = 800 if QUICK else 6000
src = rng.integers(3, V, (n, L))
tgt = np.concatenate([np.full((n, 1), BOS), src[:, ::-1], np.full((n, 1), EOS)], axis=1)
split = int(0.9 * n)

model = rc.Seq2Seq(V, V, embed=32, hidden=64 if QUICK else 128, cell="lstm", seed=0)
model.fit(src[:split], tgt[:split], optimizer=rc.optim.Adam(lr=5e-3), epochs=1 if QUICK else 10,
          batch_size=64, validation_data=(src[split:], tgt[split:]), progress=not QUICK, seed=0)
test = src[split:]
greedy = model.translate(test, max_len=L + 2, bos=BOS, eos=EOS)
beam = model.translate(test[:100], max_len=L + 2, bos=BOS, eos=EOS, beam=4)
print("exact reversals, greedy:", np.mean([g == list(s[::-1]) for g, s in zip(greedy, test)]))
print("exact reversals, beam 4:", np.mean([g == list(s[::-1]) for g, s in zip(beam, test[:100])]))
print("example:", test[0].tolist(), "->", greedy[0])
